"""A plan where users train: a PEFT LoraConfig, the Hugging Face TrainingArguments of its budget, and an axolotl
YAML fragment. Each is plain data (JSON-ready dicts, YAML text) made from the plan's rank and recipe (a Plan, or
its JSON), so the planner stays torch-free; the tests construct the real objects from them.

The budget is counted in optimizer steps over the whole corpus (memprobe trains full batch: one step is one
epoch), so the exports set one batch of every row per step: per_device_train_batch_size = the corpus's rows (or
axolotl's micro_batch_size), num_train_epochs = max_steps = the plan's steps.
"""

from __future__ import annotations

from memprobe.errors import MemprobeError


def _rank_and_recipe(plan) -> tuple:
    """(rank, Recipe) of a Plan or of its JSON (`planner recommend --json`)."""
    from memprobe.rundir import check_plan, plan_recipe

    if isinstance(plan, dict):
        rank, recipe = int(check_plan(plan)["rank"]), plan_recipe(plan)
    else:
        rank, recipe = plan.rank, plan.recipe
    if recipe is None:
        raise MemprobeError("this plan's law records no recipe: nothing to export (calibrate again)")
    return rank, recipe


def _recipe(plan):
    return _rank_and_recipe(plan)[1]


def lora_config(plan) -> dict:
    """`LoraConfig(**lora_config(plan))`: the plan's adapter (standard LoRA plans only)."""
    rank, recipe = _rank_and_recipe(plan)
    return recipe.adapter.peft_kwargs(rank)


def training_arguments(plan, n_rows: int, output_dir: str = "lora-out") -> dict:
    """`TrainingArguments(**training_arguments(plan, n_rows))`: the plan's budget for a corpus of n_rows."""
    if isinstance(n_rows, bool) or int(n_rows) != n_rows or n_rows <= 0:
        raise MemprobeError(f"n_rows must be a positive integer, got {n_rows!r}")
    b = _recipe(plan).budget
    return {"output_dir": output_dir, "max_steps": b.steps, "learning_rate": b.lr,
            "lr_scheduler_type": b.schedule, "warmup_steps": b.warmup, "weight_decay": b.weight_decay,
            "adam_beta1": b.betas[0], "adam_beta2": b.betas[1], "adam_epsilon": b.eps,
            "max_grad_norm": b.clip if b.clip is not None else 0.0, "per_device_train_batch_size": int(n_rows),
            "gradient_accumulation_steps": 1, "optim": "adamw_torch", "report_to": [], "save_strategy": "no"}


def axolotl_yaml(plan, n_rows: int) -> str:
    """An axolotl config fragment (adapter, rank, alpha, modules, learning rate, epochs, batch) for the plan."""
    peft = lora_config(plan)
    b = _recipe(plan).budget
    lines = ["adapter: lora", f"lora_r: {peft['r']}", f"lora_alpha: {peft['lora_alpha']:g}",
             f"lora_dropout: {peft['lora_dropout']:g}", "lora_target_modules:",
             *[f"  - {m}" for m in peft["target_modules"]]]
    if peft["layers_to_transform"] is not None:
        lines.append(f"peft_layers_to_transform: [{', '.join(map(str, peft['layers_to_transform']))}]")
    lines += [f"learning_rate: {b.lr:g}", f"lr_scheduler: {b.schedule}", "optimizer: adamw_torch",
              f"weight_decay: {b.weight_decay:g}", f"max_grad_norm: {b.clip if b.clip is not None else 0:g}",
              f"num_epochs: {b.steps}", f"micro_batch_size: {int(n_rows)}", "gradient_accumulation_steps: 1"]
    return "\n".join(lines) + "\n"

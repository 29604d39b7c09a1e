"""A plan where users train: a PEFT LoraConfig, the Hugging Face TrainingArguments of its budget, and an axolotl
YAML fragment. Each is plain data (JSON-ready dicts, YAML text) made from the plan's rank and recipe (a Plan, or
its JSON), so the planner stays torch-free; the tests construct the real objects from them.

The budget is counted in optimizer steps over the whole corpus (memprobe trains full batch: one step is one
epoch), so the exports set one batch of every row per step: per_device_train_batch_size = the corpus's rows (or
axolotl's micro_batch_size), num_train_epochs = max_steps = the plan's steps.

A format that cannot express the plan refuses it in one line that says what trains it instead, rather than
exporting something else under the plan's name: none of them builds an mlp-bypass (memprobe memorize does), and
axolotl trains with its own loss, not a MemFT objective.
"""

from __future__ import annotations

from memprobe.errors import MemprobeError
from planner.planning import _positive_int

FORMATS = {"peft": "a PEFT LoraConfig", "trainer": "Hugging Face TrainingArguments", "axolotl": "an axolotl config"}
PLAN_FILE = "PLAN.json"  # how a message names the plan file when the caller does not say


def _field(plan, name: str):
    """A field of a Plan or of its JSON."""
    return plan.get(name) if isinstance(plan, dict) else getattr(plan, name)


def _refuse_objective(plan, fmt: str, plan_file: str) -> None:
    """axolotl trains with its own loss: a rank planned for a MemFT objective is not what it would train."""
    objective = _field(plan, "objective")
    if fmt != "axolotl" or objective == "sft":
        return
    sft = (_field(plan, "per_objective") or {}).get("sft", {}).get("rank")
    its = f" (its sft rank is {sft})" if sft is not None else ""
    raise MemprobeError(
        f"{FORMATS[fmt]} cannot express a {objective} plan (axolotl trains with its own loss){its}: make an sft "
        f"plan for axolotl with `planner recommend --objective sft ...`, or train this one with "
        f"`memprobe memorize --plan {plan_file} --data jsonl:YOUR_DATA.jsonl`")


def expressible(plan, fmt: str, plan_file: str = PLAN_FILE) -> tuple:
    """(rank, Recipe) of a Plan or of its JSON (`planner recommend --json`) that `fmt` can express; else one line
    that says what trains the plan instead."""
    from memprobe.rundir import check_plan, plan_recipe

    if isinstance(plan, dict):
        rank, recipe = int(check_plan(plan)["rank"]), plan_recipe(plan)
    else:
        rank, recipe = plan.rank, plan.recipe
    if recipe is None:
        raise MemprobeError("this plan's law records no recipe: nothing to export (calibrate again)")
    if recipe.adapter.kind != "lora":
        # TrainingArguments carry a budget, not an adapter: exported for a bypass plan, a Trainer would train
        # whatever adapter the user brings, at a rank that was planned for another
        raise MemprobeError(
            f"{FORMATS[fmt]} cannot express an {recipe.adapter.kind} plan (the adapter is not a PEFT LoRA): train "
            f"it with `memprobe memorize --plan {plan_file} --data jsonl:YOUR_DATA.jsonl`, which saves it for "
            f"memprobe.memorize.load_bypass")
    _refuse_objective(plan, fmt, plan_file)
    return rank, recipe


def objective_note(plan, fmt: str = "trainer") -> str | None:
    """What a plain Trainer misses of the plan's objective when `fmt` is trainer (None otherwise, and for sft):
    TrainingArguments carry no loss, MemFTTrainer brings the MemFT one."""
    objective = _field(plan, "objective")
    if fmt != "trainer" or objective == "sft":
        return None
    return (f"the plan's rank is for {objective}: train with memprobe.objectives.MemFTTrainer(model, "
            f"TrainingArguments(**args), objective={objective!r}, ...); a plain Trainer trains sft")


def lora_config(plan, plan_file: str = PLAN_FILE) -> dict:
    """`LoraConfig(**lora_config(plan))`: the plan's adapter (standard LoRA plans only)."""
    rank, recipe = expressible(plan, "peft", plan_file)
    return recipe.adapter.peft_kwargs(rank)


def training_arguments(plan, n_rows: int, output_dir: str = "lora-out", plan_file: str = PLAN_FILE) -> dict:
    """`TrainingArguments(**training_arguments(plan, n_rows))`: the plan's budget for a corpus of n_rows (standard
    LoRA plans only; with a MemFT objective, MemFTTrainer takes them: see objective_note)."""
    b = expressible(plan, "trainer", plan_file)[1].budget
    rows = _positive_int("n_rows", n_rows)
    return {"output_dir": output_dir, "max_steps": b.steps, "learning_rate": b.lr,
            "lr_scheduler_type": b.schedule, "warmup_steps": b.warmup, "weight_decay": b.weight_decay,
            "adam_beta1": b.betas[0], "adam_beta2": b.betas[1], "adam_epsilon": b.eps,
            "max_grad_norm": b.clip if b.clip is not None else 0.0, "per_device_train_batch_size": rows,
            "gradient_accumulation_steps": 1, "optim": "adamw_torch", "report_to": [], "save_strategy": "no"}


def axolotl_yaml(plan, n_rows: int, plan_file: str = PLAN_FILE) -> str:
    """An axolotl config fragment (adapter, rank, alpha, modules, learning rate, epochs, batch) for the plan
    (standard LoRA sft plans only)."""
    rank, recipe = expressible(plan, "axolotl", plan_file)
    rows = _positive_int("n_rows", n_rows)
    peft, b = recipe.adapter.peft_kwargs(rank), recipe.budget
    lines = ["adapter: lora", f"lora_r: {peft['r']}", f"lora_alpha: {peft['lora_alpha']:g}",
             f"lora_dropout: {peft['lora_dropout']:g}", "lora_target_modules:",
             *[f"  - {m}" for m in peft["target_modules"]]]
    if peft["layers_to_transform"] is not None:
        lines.append(f"peft_layers_to_transform: [{', '.join(map(str, peft['layers_to_transform']))}]")
    lines += [f"learning_rate: {b.lr:g}", f"lr_scheduler: {b.schedule}", "optimizer: adamw_torch",
              f"weight_decay: {b.weight_decay:g}", f"max_grad_norm: {b.clip if b.clip is not None else 0:g}",
              f"num_epochs: {b.steps}", f"micro_batch_size: {rows}", "gradient_accumulation_steps: 1"]
    return "\n".join(lines) + "\n"


def export(plan, fmt: str, rows: int | None = None, plan_file: str = PLAN_FILE) -> str:
    """The plan as `fmt` (peft | trainer | axolotl) text: what `planner export` prints."""
    import json

    if fmt not in FORMATS:
        raise MemprobeError(f"--format must be peft, trainer or axolotl, got {fmt!r}")
    expressible(plan, fmt, plan_file)  # a plan the format cannot carry is refused before --rows is asked for
    if fmt == "peft":
        return json.dumps(lora_config(plan, plan_file), sort_keys=True, indent=2) + "\n"
    if rows is None:
        raise MemprobeError(f"--format {fmt} needs --rows (the rows of your corpus)")
    rows = _positive_int("rows", rows)
    if fmt == "axolotl":
        return axolotl_yaml(plan, rows, plan_file)
    return json.dumps(training_arguments(plan, rows, plan_file=plan_file), sort_keys=True, indent=2) + "\n"

"""planner: turn a fitted Parametric Memory Law into a LoRA plan (numpy/scipy only, never torch)."""

_LAZY = {"recommend": "planner.recommend", "Plan": "planner.recommend"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")


__all__ = list(_LAZY)

"""planner: turn a fitted Parametric Memory Law into an adapter plan (numpy/scipy only, never torch).

`from planner import recommend` is the function: the module that holds it is planner.planning, so no submodule
of the same name can shadow it once the command line (or anything else) has imported the planner's modules.
"""

_LAZY = {name: "planner.planning" for name in ("recommend", "Plan", "curve", "Curve")}


def __getattr__(name):
    # lazy, so that `import planner` stays as light as memprobe.law until a plan is asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")


__all__ = list(_LAZY)

"""memprobe: measure how much a LoRA adapter memorizes, and fit the Parametric Memory Law.

Importing ``memprobe`` (and ``memprobe.law``) never imports torch: the torch-side modules
load lazily, on first attribute access, so that planning code and notebooks reading a
law file stay light.
"""

from memprobe.errors import MemprobeError

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access (PEP 562)
_LAZY = {
    "MemoryLaw": "memprobe.law",
    "load_laws": "memprobe.law",
    "save_laws": "memprobe.law",
    "fit_law": "memprobe.fit",
    "fit_laws": "memprobe.fit",
    "LawFit": "memprobe.fit",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memprobe' has no attribute {name!r}")


__all__ = ["MemprobeError", "__version__", *_LAZY]

"""rlft: fine-tune language models with SFT, reinforcement learning with graders, and preference optimisation."""

import importlib

__version__ = "0.1.0"


def lazy_names(package: str, module_of: dict[str, str]):
    """A package's ``__getattr__`` that loads ``package.<module_of[name]>`` the first time ``name`` is asked for, so
    importing one light module of the package (its config, say) loads none of the heavy ones."""

    def __getattr__(name: str):
        if name in module_of:
            return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

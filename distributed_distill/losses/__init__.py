"""Knowledge-distillation objectives (the implementation and its documentation are in `kd.py`, docs/losses.md; the
hidden-state losses in `hints.py`, docs/hints.md; the cross-tokenizer losses in `cross.py`).

The names of the objectives live here, apart from the torch code, so that the config (`distill.loss`) takes its
choices from the loss module without importing torch: a config mistake, or a second job refused by the run
directory's lock, answers in a fraction of a second. Everything else (`kd_loss`, `chunked_distill_loss`,
`TeacherTargets`, `hint_loss`, ...) is loaded from `kd.py` or `hints.py` on first use. The loss module imports
nothing else from the package.
"""

from __future__ import annotations

import importlib
import typing

LossKind = typing.Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse"]
KINDS: tuple[str, ...] = typing.get_args(LossKind)
# Hidden-state ("hint") losses between a projected student state and a teacher state (`hints.py`, docs/hints.md).
HintKind = typing.Literal["mse", "cosine", "normalized_mse"]
HINT_KINDS: tuple[str, ...] = typing.get_args(HintKind)
# Losses between a teacher and a student with different tokenizers, over aligned spans (`cross.py`).
CrossKind = typing.Literal["uld", "hybrid"]
CROSS_KINDS: tuple[str, ...] = typing.get_args(CrossKind)
# The modules that hold the torch code, searched in this order for a name asked of the package.
_MODULES = (".kd", ".hints", ".cross")


def __getattr__(name: str):
    for module in _MODULES:  # the objectives themselves, and torch, on first use
        found = importlib.import_module(module, __name__)
        if hasattr(found, name):
            return getattr(found, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    names = set(globals())
    for module in _MODULES:
        names.update(n for n in vars(importlib.import_module(module, __name__)) if not n.startswith("__"))
    return sorted(names)

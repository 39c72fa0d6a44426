"""Knowledge-distillation objectives (the implementation and its documentation are in `kd.py`; docs/losses.md).

The names of the objectives live here, apart from the torch code, so that the config (`distill.loss`) takes its
choices from the loss module without importing torch: a config mistake, or a second job refused by the run
directory's lock, answers in a fraction of a second. Everything else (`kd_loss`, `chunked_distill_loss`,
`TeacherTargets`, ...) is loaded from `kd.py` on first use. The loss module imports nothing else from the package.
"""

from __future__ import annotations

import importlib
import typing

LossKind = typing.Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse"]
KINDS: tuple[str, ...] = typing.get_args(LossKind)


def __getattr__(name: str):
    kd = importlib.import_module(".kd", __name__)  # the objectives themselves, and torch, on first use
    try:
        return getattr(kd, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    kd = importlib.import_module(".kd", __name__)
    return sorted({*globals(), *(n for n in vars(kd) if not n.startswith("__"))})

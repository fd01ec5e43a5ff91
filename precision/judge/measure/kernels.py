"""Which kernel measures a clean chunk: numpy (always there) or the fused kernel of
:mod:`precision.judge.measure.fused` (numba, the optional ``fast`` extra).

Both give the same counts and maxima, and sums equal up to float64 rounding
(:class:`~precision.judge.measure.metrics.PairAccumulator`); the choice is one of speed:
loading numba costs about 0.5 s per process, which the fused kernel repays from about
:data:`FUSED_MIN_ELEMENTS` elements of work on (docs/performance.md).
"""

from __future__ import annotations

from typing import Any

from ...errors import InputError
from ...kernel_choice import KERNEL_ENV, wanted_kernel

#: what measures a clean chunk: numpy, or the fused kernel (numba, an optional extra)
KERNELS = ("numpy", "numba")
#: below this much work (elements), loading numba (about 0.5 s) costs more than the fused
#: kernel saves on one job (about 8 ns per element; docs/performance.md)
FUSED_MIN_ELEMENTS = 64 << 20

_FUSED_LOADED = False
_FUSED_FAILED = False


def load_fused() -> Any:
    """The fused kernel's module (imports numba: only when a ``numba`` kernel runs)."""
    from . import fused

    return fused


def choose_kernel(elements: float) -> str:
    """The kernel for a compare of ``elements`` (see ``Pair.cost``): ``numba`` when it is
    installed and either already loaded in this process or the work is large enough to
    repay loading it (about 0.5 s per process: :data:`FUSED_MIN_ELEMENTS`); it is loaded
    here, so that forked workers inherit it. Else ``numpy``. ``PRECISION_KERNEL=numpy`` or
    ``=numba`` decides instead."""
    global _FUSED_LOADED, _FUSED_FAILED
    wanted = wanted_kernel()
    if wanted == "numpy" or (wanted != "numba" and (
            _FUSED_FAILED or (not _FUSED_LOADED and elements < FUSED_MIN_ELEMENTS))):
        return "numpy"
    try:
        load_fused().warm()
    except Exception as e:  # not installed, or LLVM cannot load (under a memory limit)
        if wanted == "numba":
            raise InputError(f"{KERNEL_ENV}=numba, but numba cannot be loaded ({e}): "
                             "pip install 'precision[fast]'") from None
        _FUSED_FAILED = True
        return "numpy"
    _FUSED_LOADED = True
    return "numba"

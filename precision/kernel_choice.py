"""``PRECISION_KERNEL``: which kernels run, the capture's statistics and compare's measures
alike, read in one place.

``numpy`` keeps both on numpy and torch's reductions, ``numba`` insists on the compiled
kernels (the ``fast`` extra; one that cannot load is then an error), ``auto`` (or unset) uses
them where numba loads and the work repays loading it.
"""

from __future__ import annotations

import os

from .errors import InputError

#: the environment variable
KERNEL_ENV = "PRECISION_KERNEL"
#: what it may say (besides nothing)
CHOICES = ("auto", "numpy", "numba")


def wanted_kernel() -> str:
    """``PRECISION_KERNEL``'s choice: ``numpy``, ``numba`` or ``auto`` (unset or blank); any
    other value is an :class:`~precision.errors.InputError`."""
    wanted = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise InputError(f"{KERNEL_ENV}={wanted}: use numpy, numba or auto")
    return wanted

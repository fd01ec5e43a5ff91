"""What a comparison takes besides its two runs: one declaration, for the API and the CLI.

:func:`precision.compare` takes a :class:`CompareOptions` (or its fields as keyword
arguments); ``precision compare`` and ``precision report`` build one from their flags
(:mod:`precision.commands.options`), so the two commands offer the same comparison.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InputError, given
from .report import FAIL_ON

if TYPE_CHECKING:
    from ..dumps.dump import Dump


@dataclass(frozen=True)
class CompareOptions:
    """Everything a comparison takes besides its runs, in three groups: what to compare,
    how to judge it, how to run it. The defaults are the CLI's."""

    # --- what to compare
    #: a third run: the same inputs in the target's precision on a trusted backend
    reference: str | os.PathLike[str] | Dump | None = None
    #: without ``reference``, take the baseline's sibling ``BASE.<precision>-reference.st``
    auto_reference: bool = True
    #: a mapping file: an engine's records onto Hugging Face's instead of the family's table
    #: (``rules``), and another framework's module names onto Hugging Face's (``modules``)
    mapping: str | os.PathLike[str] | None = None
    allow_different_models: bool = False
    #: read an unfinished multi-rank dump's shards (with a warning)
    allow_partial: bool = False

    # --- how to judge
    #: the tolerance profile's norm tolerance and absolute floor, overridden
    rtol: float | None = None
    atol: float | None = None
    #: judge as fp32 against this precision instead of what the runs record
    profile: str | None = None
    #: what a run computed in when its file cannot say (logits saved as fp32 from a bf16 run)
    base_dtype: str | None = None
    target_dtype: str | None = None
    #: which statuses make the report falsy (:data:`precision.judge.report.FAIL_ON`)
    fail_on: str = "drift"
    #: k of the logits' top-k overlap
    topk: int = 5

    # --- how to run
    #: worker processes sharing the tensor pairs; None: the usable cores
    jobs: int | None = None
    #: bytes the work buffers of all jobs may hold together; None: about 10 MiB per job
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.fail_on not in FAIL_ON:
            raise InputError(f"{given('--fail-on', 'fail_on', self.fail_on)}: choose one "
                             f"of {', '.join(FAIL_ON)}")
        if self.jobs is not None and self.jobs < 1:
            raise InputError(f"{given('--jobs', 'jobs', self.jobs)}: use 1 or more")
        if self.topk < 1:
            raise InputError(f"{given('--topk', 'topk', self.topk)}: use 1 or more")
        for name, value in (("rtol", self.rtol), ("atol", self.atol)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InputError(f"{given(f'--{name}', name, value)}: a tolerance is a "
                                 "finite number, 0 or more")

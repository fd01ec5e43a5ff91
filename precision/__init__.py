"""precision: where and why a model's numbers change across devices and dtypes.

Capture per-layer activations of a model into a dump (needs torch), then compare two dumps
(needs only numpy)::

    import precision
    with precision.capture(model, "fp32.st") as cap:
        model(**inputs)
    report = precision.compare("fp32.st", "fp16.st")
    assert report, report.summary

Importing this package does not import torch; :func:`capture` and :func:`keep_fp32` load it
on first use, and :func:`plot` loads matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .dumps import load
from .dumps.dump import Dump
from .errors import DeviceError, DumpError, InputError, ModelError, OutputError, PrecisionError
from .judge.compare import compare
from .judge.measure.row import Row
from .judge.options import CompareOptions
from .judge.report import Report
from .judge.scan import ScanReport, scan

if TYPE_CHECKING:
    from .doctor.checks import Suggestion
    from .doctor.isolation import IsolateReport
    from .runtime.capture.recorder import Capture
    from .workflows.port import PortResult

__all__ = [
    "Capture",
    "CompareOptions",
    "DeviceError",
    "Dump",
    "DumpError",
    "InputError",
    "ModelError",
    "OutputError",
    "PortResult",
    "PrecisionError",
    "Report",
    "Row",
    "ScanReport",
    "__version__",
    "capture",
    "compare",
    "isolate",
    "keep_fp32",
    "load",
    "plot",
    "port",
    "scan",
    "suggest",
]


def capture(model: Any, path: Any = None, **options: Any) -> Capture:
    """Record ``model``'s module outputs while the ``with`` block runs; see :class:`Capture`."""
    from .runtime.capture.recorder import Capture

    return Capture(model, path, **options)


def keep_fp32(model: Any, patterns: Any, *, hand_on: str = "auto") -> list[str]:
    """Keep the modules of ``model`` matching glob ``patterns`` in fp32; returns their names.

    They compute in fp32 on upcast inputs and hand their outputs on in the model's compute
    dtype (``hand_on="compute"``) or in fp32 (``"fp32"``: a residual stream in fp32, the
    modules after them still computing in fp16/bf16); ``"auto"`` is ``fp32`` for the modules
    the model keeps in fp32 itself (T5's ``wo``) and ``compute`` for the rest. A glob may
    carry its own: ``'model.layers.*:fp32'``. See :mod:`precision.runtime.models.keep`.
    """
    from .runtime.models.keep import keep_fp32 as _keep

    return _keep(model, [patterns] if isinstance(patterns, str) else list(patterns),
                 hand_on=hand_on)


def plot(report: Report, ax: Any = None) -> Any:
    """Matplotlib figure of ``report``: error versus depth, the verdict's metric on a log axis
    with its DRIFT limit, flagged layers marked (:func:`precision.outputs.plots.error_vs_depth`);
    drawn on ``ax`` when given, else on a new pyplot figure (a notebook shows it)."""
    from .outputs.plots import error_vs_depth

    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(9, 3.4), layout="constrained")
    return error_vs_depth(report, ax)


def _model_folder(model: Any, call: str) -> str:
    """``model`` as the folder ``call`` loads it from; a loaded model is one line."""
    import os

    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    raise InputError(f"precision.{call} takes the model's folder (what from_pretrained loads), "
                     f"not a loaded {type(model).__name__}: it loads the model for each run "
                     "itself; save yours with model.save_pretrained(DIR) and pass DIR")


def suggest(model: str, **options: Any) -> Suggestion:
    """Find and verify a small keep-fp32 policy; see :func:`precision.doctor.checks.suggest`."""
    from .doctor.checks import suggest as _suggest

    return _suggest(_model_folder(model, "suggest"), **options)


def isolate(base: Any, model: str, **options: Any) -> IsolateReport:
    """Local versus inherited error per module; see :func:`precision.doctor.isolation.isolate`."""
    from .doctor.isolation import isolate as _isolate

    return _isolate(base, _model_folder(model, "isolate"), **options)


def port(model: str, **options: Any) -> PortResult:
    """Port ``model`` to a device and dtype end to end: baseline, target, compare,
    self-consistency, and when flagged scan, isolate, suggest and the verified fix; writes
    report.html, port.json and PORT.md in ``output`` (default ``port``). The result is truthy
    when the target passes as it is; see :func:`precision.workflows.port.port`."""
    from .workflows.port import port as _port

    return _port(_model_folder(model, "port"), **options)


def __getattr__(name: str) -> Any:
    if name == "Capture":
        from .runtime.capture.recorder import Capture

        return Capture
    if name == "PortResult":
        from .workflows.port import PortResult

        return PortResult
    raise AttributeError(f"module 'precision' has no attribute {name!r}")

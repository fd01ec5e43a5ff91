"""One bf16 training step of the Qwen fixture on CUDA under each attention kernel, against a
CPU fp32 baseline and its CPU bf16 reference (what docs/cuda.md reports).

    python scripts/gpu_kernels.py OUT_DIR [DEVICE]   (writes OUT_DIR/kernels.json)

DEVICE is ``cuda`` by default; ``cpu`` runs the same variants on the CPU (the SDPA kernels
that exist only on a GPU are then recorded as refused).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

import precision
from precision.dumps import reference_path
from precision.runtime.run.runner import CaptureOptions, run_capture

QWEN = str(Path(__file__).resolve().parent.parent / "fixtures" / "tiny-qwen3")


@contextlib.contextmanager
def default() -> Iterator[None]:
    yield


@contextlib.contextmanager
def no_reduced_precision_reduction() -> Iterator[None]:
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Every from_pretrained asks for transformers' eager attention."""
    original = transformers.PreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def load(cls: Any, *args: Any, **kwargs: Any) -> Any:
        return original(cls, *args, **kwargs | {"attn_implementation": "eager"})

    transformers.PreTrainedModel.from_pretrained = classmethod(load)  # type: ignore[assignment]
    try:
        yield
    finally:
        transformers.PreTrainedModel.from_pretrained = classmethod(original)  # type: ignore


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "default": default, "sdpa-math": lambda: sdpa_kernel(SDPBackend.MATH),
    "sdpa-efficient": lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
    "sdpa-flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
    "eager": eager, "no-reduced-precision-reduction": no_reduced_precision_reduction}


def worst(report: precision.Report, n: int = 6) -> list[str]:
    rows = sorted((r for r in report.rows if r.metrics is not None),
                  key=lambda r: -r.metrics.rel_l2)  # type: ignore[union-attr]
    return [f"{r.key} {r.metrics.rel_l2:.4f}" for r in rows[:n]]  # type: ignore[union-attr]


def main() -> None:
    out, device = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cuda"
    work = Path(tempfile.mkdtemp(prefix="precision-kernels-"))

    def capture(name: str, dtype: str, device: str, **kw: Any) -> Path:
        return run_capture(CaptureOptions(model=QWEN, output=str(work / f"{name}.st"),
                                          device=device, dtype=dtype, backward=True,
                                          force=True, **kw))

    base = capture("base", "fp32", "cpu", expect=("bf16",))
    ref = precision.compare(base, reference_path(base, "bf16"), auto_reference=False)
    result: dict[str, Any] = {"cpu bf16 reference": {"summary": ref.summary,
                                                     "worst": worst(ref)},
                              "cudnn": torch.backends.cudnn.version()}
    for name, variant in VARIANTS.items():
        try:
            with variant():
                target = capture(name, "bf16", device, replay=str(base))
        except precision.PrecisionError as e:
            result[f"{name} bf16"] = f"{type(e).__name__}: {e}"
            continue
        fixed = precision.compare(base, target, auto_reference=False)
        result[f"{name} bf16"] = {
            "with reference": precision.compare(base, target).summary,
            "fixed limits": fixed.summary, "worst": worst(fixed)}
        print(name, result[f"{name} bf16"]["with reference"], flush=True)
    (out / "kernels.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""What shapes the numbers besides the model, recorded with every capture: library versions,
and the settings that decide what "fp32" means on a device.

CUDA may run fp32 matmuls in TF32 (10-bit mantissa) when
``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision("high")``
asks, and runs cuDNN convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``).
Ascend runs convolutions in HF32 by default (``torch_npu.npu.conv.allow_hf32``) and matmuls
when ``torch_npu.npu.matmul.allow_hf32`` is set. The compare side reads these to pick the
tf32/hf32 profile for an fp32 run (:func:`precision.judge.profiles.effective_precision`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable

import torch

from ...dumps.meta import ComputeSettings


def compute_settings(model: torch.nn.Module,
                     tree: Iterable[tuple[str, torch.nn.Module]] | None = None
                     ) -> ComputeSettings:
    """The device type and the matmul/convolution precision settings in force now
    (``tree``: the model's ``named_modules()``, when they were walked already)."""
    param = next(model.parameters(), None)
    walked = model.named_modules() if tree is None else tree
    settings: ComputeSettings = {
        "device_type": param.device.type if param is not None else "cpu",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "has_conv": any(isinstance(m, torch.nn.modules.conv._ConvNd) for _, m in walked),
    }
    npu = sys.modules.get("torch_npu")  # never imported here: present only on an NPU run
    if npu is not None:
        try:
            settings["npu_matmul_allow_hf32"] = bool(npu.npu.matmul.allow_hf32)
            settings["npu_conv_allow_hf32"] = bool(npu.npu.conv.allow_hf32)
        except AttributeError:  # an older torch_npu without these switches
            pass
    return settings


def environment() -> dict[str, str]:
    """Versions of the libraries that shape the numbers: Python, torch, the platform, and
    transformers, torch_npu and numpy where this process has imported them (one that it has
    not cannot have run the model; importing it here would cost seconds, or a search of the
    path for one that is absent, at each capture)."""
    python, system = _interpreter()
    env = {"python": python, "torch": torch.__version__, "platform": system}
    for mod in ("transformers", "torch_npu", "numpy"):
        version = getattr(sys.modules.get(mod), "__version__", None)
        if isinstance(version, str):
            env[mod] = version
    return env


@functools.cache
def _interpreter() -> tuple[str, str]:
    """Python's version and ``platform.platform()`` (which runs ``uname`` and reads the C
    library's version): the same for the whole process."""
    import platform

    return platform.python_version(), platform.platform()

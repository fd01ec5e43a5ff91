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

import sys

import torch

from ...dumps.meta import ComputeSettings


def compute_settings(model: torch.nn.Module) -> ComputeSettings:
    """The device type and the matmul/convolution precision settings in force now."""
    param = next(model.parameters(), None)
    settings: ComputeSettings = {
        "device_type": param.device.type if param is not None else "cpu",
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "has_conv": any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules()),
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
    """Versions of the libraries that shape the numbers."""
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform()}
    for mod in ("transformers", "torch_npu", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # absent or broken: not recorded
            continue
    return env

"""Typed views of what a capture writes into a dump's metadata.

The dump header is JSON (docs/format.md); the sections that code on both halves reads are
declared here, so the torch side that writes them and the numpy side that reads them agree
on names and types.
"""

from __future__ import annotations

from typing import TypedDict


class ComputeSettings(TypedDict, total=False):
    """``meta["compute"]``: what decides what "fp32" means on the capture's device
    (written by :func:`precision.runtime.capture.compute.compute_settings`, read by
    :func:`precision.judge.profiles.effective_precision`)."""

    device_type: str
    float32_matmul_precision: str
    cuda_matmul_allow_tf32: bool
    cudnn_allow_tf32: bool
    has_conv: bool
    npu_matmul_allow_hf32: bool
    npu_conv_allow_hf32: bool

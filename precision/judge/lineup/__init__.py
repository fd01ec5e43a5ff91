"""Stage 1, line up: which records of two runs are the same record, at which real tokens,
and what each run computed in."""

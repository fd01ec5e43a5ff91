"""Compare timings for scripts/bench, in a process as lean as `precision compare`'s.

Forking the benchmark's own process (torch, three models, a host buffer) for the compare
workers would cost more than forking the CLI does, so the compare is timed here: one job
and two jobs alternate round by round; the page cache is warm, as for a second compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from benchutil import interleaved, peak_rss  # scripts/ is on the path

from precision.judge.compare import compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("base")
    ap.add_argument("target")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    compare(args.base, args.target)  # warm the page cache
    times = interleaved({"jobs1": lambda: compare(args.base, args.target, jobs=1),
                         "jobs2": lambda: compare(args.base, args.target, jobs=2)},
                        args.repeat, lambda: None)
    with peak_rss() as mem:
        compare(args.base, args.target, jobs=2)
    with peak_rss() as capped:
        compare(args.base, args.target, jobs=2, max_memory=4 << 20)
    json.dump({"jobs1_s": statistics.median(times["jobs1"]),
               "jobs2_s": statistics.median(times["jobs2"]),
               "jobs2_speedup": statistics.median(
                   a / b for a, b in zip(times["jobs1"], times["jobs2"], strict=True)),
               "peak_extra_bytes": mem["extra"], "capped_peak_extra_bytes": capped["extra"]},
              sys.stdout)


if __name__ == "__main__":
    main()

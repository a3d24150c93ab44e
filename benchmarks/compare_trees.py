"""Compare two checkouts of bgtask in one interleaved run: call-to-result latency and a burst.

Each round runs one fresh interpreter per tree, in alternating order, that imports bgtask from
that tree, warms up, then measures the median latency of no-op calls (call to result) and the
throughput of a burst of tasks. The machines are shared and noisy: report medians over rounds
and the ratio of the two trees, never one number alone.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py /tmp/before .   # --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

PROBE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import bgtask

@bgtask.background
def noop():
    return None

for _ in range(20):
    noop().result(60)
lat = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    noop().result(60)
    lat.append(time.perf_counter() - t0)
n = int(sys.argv[3])
t0 = time.perf_counter()
tasks = [noop() for _ in range(n)]
for task in tasks:
    task.result(60)
burst = n / (time.perf_counter() - t0)
for task in tasks:
    task.join(60)
lat.sort()
print(json.dumps({"latency_ms": lat[len(lat) // 2] * 1e3, "burst_per_s": burst}))
"""


def run_one(tree: str, calls: int, burst: int) -> Dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(Path(tree).resolve()), str(calls), str(burst)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--burst", type=int, default=200)
    args = parser.parse_args()
    samples: Dict[str, Dict[str, List[float]]] = {
        name: {"latency_ms": [], "burst_per_s": []} for name in ("before", "after")
    }
    for i in range(args.rounds):
        order = [("before", args.before), ("after", args.after)]
        if i % 2:
            order.reverse()
        for name, tree in order:
            for key, value in run_one(tree, args.calls, args.burst).items():
                samples[name][key].append(value)
    print(f"{args.rounds} interleaved rounds; medians over rounds (min-max)")
    for key in ("latency_ms", "burst_per_s"):
        before, after = (statistics.median(samples[n][key]) for n in ("before", "after"))
        spans = {n: f"{min(samples[n][key]):.2f}-{max(samples[n][key]):.2f}" for n in samples}
        # Each round runs both trees back to back: the ratio within a round is what the load
        # of a shared machine disturbs least. Its median, and the middle half of the rounds.
        ratios = sorted(a / b for a, b in zip(samples["after"][key], samples["before"][key]))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(
            f"{key:12} before {before:8.2f} ({spans['before']})  after {after:8.2f} "
            f"({spans['after']})  after/before {after / before:.2f}; within rounds "
            f"{statistics.median(ratios):.2f} (middle half {quartiles[0]:.2f}-{quartiles[2]:.2f})"
        )


if __name__ == "__main__":
    main()

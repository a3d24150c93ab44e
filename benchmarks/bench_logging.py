"""The logging relay's cost: records per second, and what it adds to a call.

- records per second into one ``FileHandler`` of the main program: logged by the main program
  itself, and logged by a task through the relay;
- no-op call-to-result latency with the relay (the default) and without (``relay_logging=False``).

Rounds alternate the variants; medians over rounds, and ratios within each round. The machines
are shared and noisy: compare ratios, never one number alone.

    python benchmarks/bench_logging.py            # --rounds 7 --records 20000
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import bgtask

LOGGER = "bench.relay"


@bgtask.background
def log_records(n: int) -> None:
    log = logging.getLogger(LOGGER)
    for i in range(n):
        log.info("record %d of the benchmark", i)


@bgtask.background
def noop() -> None:
    return None


@bgtask.background(relay_logging=False)
def noop_unrelayed() -> None:
    return None


def records_in_main(n: int) -> float:
    log = logging.getLogger(LOGGER)
    started = time.perf_counter()
    for i in range(n):
        log.info("record %d of the benchmark", i)
    return n / (time.perf_counter() - started)


def records_through_relay(n: int) -> float:
    started = time.perf_counter()
    log_records(n).result(600)
    return n / (time.perf_counter() - started)


def latency_ms(fn: bgtask.Background[[], None], calls: int) -> float:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        fn().result(60)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        handler = logging.FileHandler(Path(tmp) / "bench.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(name)s %(message)s"))
        logger = logging.getLogger(LOGGER)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for _ in range(20):
            noop().result(60)
        samples: Dict[str, List[float]] = {k: [] for k in ("main", "relay", "with", "without")}
        for _ in range(args.rounds):
            samples["main"].append(records_in_main(args.records))
            samples["relay"].append(records_through_relay(args.records))
            samples["with"].append(latency_ms(noop, args.calls))
            samples["without"].append(latency_ms(noop_unrelayed, args.calls))
        handler.close()
    print(f"{args.rounds} rounds, medians (ratios: median of the ratios within each round)")
    ratio = statistics.median(r / m for r, m in zip(samples["relay"], samples["main"]))
    print(
        f"records/s into a FileHandler: main program {statistics.median(samples['main']):,.0f}, "
        f"a task through the relay {statistics.median(samples['relay']):,.0f} ({ratio:.2f}x)"
    )
    ratio = statistics.median(w / o for w, o in zip(samples["with"], samples["without"]))
    print(
        f"no-op latency: relay on {statistics.median(samples['with']):.2f} ms, off "
        f"{statistics.median(samples['without']):.2f} ms ({ratio:.2f}x)"
    )


if __name__ == "__main__":
    main()

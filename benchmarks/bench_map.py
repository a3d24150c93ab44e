"""``map`` over many items: bgtask (a fresh process per item) against pools that reuse workers.

Two workloads, on every core of the machine (``limit`` / ``max_workers`` = CPU count):

- ``cpu``: items of 5 ms of CPU work each;
- ``noop``: items that return at once (what a call costs, and nothing else).

Peers: ``ProcessPoolExecutor.map`` (reused workers, and ``max_tasks_per_child=1``, the stdlib's
fresh process per item, on Python 3.11+), ``multiprocessing.Pool.imap``, pebble's
``ProcessPool.map`` and loky's reusable executor. Rounds alternate the peers; medians over
rounds, and bgtask's ratio to each peer within each round. The machines are shared and noisy:
compare ratios, never one number alone.

    python benchmarks/bench_map.py            # --rounds 3 --cpu-items 1000 --noop-items 2000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import bgtask


def burn(ms: float) -> int:
    """About ``ms`` milliseconds of CPU work."""
    end = time.process_time() + ms / 1000
    n = 0
    while time.process_time() < end:
        n += 1
    return n


def noop(x: float) -> float:
    return x


WORKERS = os.cpu_count() or 1
bg_burn = bgtask.background(burn)
bg_noop = bgtask.background(noop)


def run_bgtask(fn: Callable[[float], object], items: List[float]) -> None:
    target = bg_burn if fn is burn else bg_noop
    for _ in target.map(items, limit=WORKERS):
        pass


def run_executor(fn: Callable[[float], object], items: List[float], **kwargs: int) -> None:
    with concurrent.futures.ProcessPoolExecutor(WORKERS, **kwargs) as pool:
        for _ in pool.map(fn, items, chunksize=1):
            pass


def run_pool_imap(fn: Callable[[float], object], items: List[float]) -> None:
    with multiprocessing.Pool(WORKERS) as pool:
        for _ in pool.imap(fn, items):
            pass


def run_pebble(fn: Callable[[float], object], items: List[float]) -> None:
    import pebble

    with pebble.ProcessPool(WORKERS) as pool:
        for _ in pool.map(fn, items).result():
            pass


def run_loky(fn: Callable[[float], object], items: List[float]) -> None:
    import loky

    executor = loky.get_reusable_executor(max_workers=WORKERS)
    for _ in executor.map(fn, items):
        pass


def peers() -> Dict[str, Callable[[Callable[[float], object], List[float]], None]]:
    found: Dict[str, Callable[[Callable[[float], object], List[float]], None]] = {
        "bgtask map (a process per item)": run_bgtask,
        "ProcessPoolExecutor.map (reused workers)": run_executor,
    }
    if sys.version_info >= (3, 11):
        found["ProcessPoolExecutor.map, max_tasks_per_child=1"] = lambda fn, items: run_executor(
            fn, items, max_tasks_per_child=1
        )
    found["multiprocessing.Pool.imap"] = run_pool_imap
    for name, module, runner in (
        ("pebble ProcessPool.map", "pebble", run_pebble),
        ("loky", "loky", run_loky),
    ):
        try:
            __import__(module)
        except ImportError:
            continue
        found[name] = runner
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-items", type=int, default=1000)
    parser.add_argument("--noop-items", type=int, default=2000)
    args = parser.parse_args()
    multiprocessing.set_start_method("fork")
    workloads = {"cpu": (burn, [5.0] * args.cpu_items), "noop": (noop, [0.0] * args.noop_items)}
    bg_noop(0).result()  # the zygote starts once, outside the clock
    runners = peers()
    rates: Dict[str, Dict[str, List[float]]] = {w: {name: [] for name in runners} for w in workloads}
    for _ in range(args.rounds):
        for workload, (fn, items) in workloads.items():
            for name, runner in runners.items():
                started = time.perf_counter()
                runner(fn, items)
                rates[workload][name].append(len(items) / (time.perf_counter() - started))
    print(f"{args.rounds} rounds, {WORKERS} workers, python {sys.version.split()[0]}\n")
    ours = "bgtask map (a process per item)"
    for workload, by_name in rates.items():
        fn, items = workloads[workload]
        print(f"{workload}: {len(items)} items\n")
        print("| runner | items/s (median) | bgtask / it (median of rounds) |")
        print("|---|---|---|")
        for name, values in by_name.items():
            ratios = [a / b for a, b in zip(by_name[ours], values)]
            print(f"| {name} | {statistics.median(values):,.0f} | {statistics.median(ratios):.2f}x |")
        print()


if __name__ == "__main__":
    main()

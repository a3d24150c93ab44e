"""``map`` over many items: bgtask (a fresh process per item) against pools that reuse workers.

Items of 0, 1, 5 and 20 ms of CPU work, on every core of the machine (``limit`` /
``max_workers`` = CPU count). Peers: ``ProcessPoolExecutor.map`` (reused workers, and
``max_tasks_per_child=1``, the stdlib's own fresh process per item, on Python 3.11+),
``multiprocessing.Pool.imap``, pebble's ``ProcessPool.map``, loky's reusable executor, and the
raw-fork floor: ``os.fork()`` in the main program for each item, the result back through a
pipe, as many children at once as cores (what a process per item costs with no library at
all). Rounds alternate the peers; medians over rounds, and bgtask's ratio to each peer within
each round. The machines are shared and noisy: compare ratios, never one number alone.

    python benchmarks/bench_map.py             # --rounds 3; writes results_map.md's tables
    python benchmarks/bench_map.py --chart map.png
    python benchmarks/bench_map.py --memory 100000   # main program's RSS over a lazy map

The slow fresh-process peers (``max_tasks_per_child=1``) get a tenth of the items: a rate is
a rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import pickle
import resource
import selectors
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List

import bgtask


def burn(ms: float) -> int:
    """About ``ms`` milliseconds of CPU work (none for 0)."""
    if not ms:
        return 0
    end = time.process_time() + ms / 1000
    n = 0
    while time.process_time() < end:
        n += 1
    return n


WORKERS = os.cpu_count() or 1
bg_burn = bgtask.background(burn)
Runner = Callable[[List[float]], None]


def run_bgtask(items: List[float]) -> None:
    for _ in bg_burn.map(items, limit=WORKERS):
        pass


def run_executor(items: List[float], **kwargs: int) -> None:
    with concurrent.futures.ProcessPoolExecutor(WORKERS, **kwargs) as pool:
        for _ in pool.map(burn, items, chunksize=1):
            pass


def run_pool_imap(items: List[float]) -> None:
    with multiprocessing.Pool(WORKERS) as pool:
        for _ in pool.imap(burn, items):
            pass


def run_pebble(items: List[float]) -> None:
    import pebble

    with pebble.ProcessPool(WORKERS) as pool:
        for _ in pool.map(burn, items).result():
            pass


def run_loky(items: List[float]) -> None:
    import loky

    executor = loky.get_reusable_executor(max_workers=WORKERS)
    for _ in executor.map(burn, items):
        pass


def run_raw_fork(items: List[float]) -> None:
    """The floor of a process per item: fork, compute, write the pickled result, _exit."""
    selector = selectors.DefaultSelector()
    pending = iter(items)
    running: Dict[int, int] = {}  # read end -> pid

    def launch(item: float) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            data = pickle.dumps(burn(item))
            os.write(w, data)
            os._exit(0)
        os.close(w)
        running[r] = pid
        selector.register(r, selectors.EVENT_READ)

    for item in pending:
        launch(item)
        if len(running) == WORKERS:
            break
    while running:
        for key, _ in selector.select():
            r = key.fd
            chunks = []
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            pickle.loads(b"".join(chunks))
            selector.unregister(r)
            os.close(r)
            os.waitpid(running.pop(r), 0)
            item = next(pending, None)
            if item is not None:
                launch(item)
    selector.close()


OURS = "bgtask map (a process per item)"
RAW = "raw fork floor (os.fork per item)"
SLOW = "ProcessPoolExecutor.map, max_tasks_per_child=1"


def peers() -> Dict[str, Runner]:
    found: Dict[str, Runner] = {
        OURS: run_bgtask,
        RAW: run_raw_fork,
        "ProcessPoolExecutor.map (reused workers)": run_executor,
    }
    if sys.version_info >= (3, 11):
        found[SLOW] = lambda items: run_executor(items, max_tasks_per_child=1)
    found["multiprocessing.Pool.imap"] = run_pool_imap
    optional = (("pebble ProcessPool.map", "pebble", run_pebble), ("loky", "loky", run_loky))
    for name, module, runner in optional:
        try:
            __import__(module)
        except ImportError:
            continue
        found[name] = runner
    return found


# Items per run for each item size (ms of CPU work): a few seconds for bgtask on 2 cores.
ITEMS = {0.0: 20000, 1.0: 2000, 5.0: 2000, 20.0: 500}


def measure(rounds: int, sizes: Dict[float, int]) -> Dict[float, Dict[str, List[float]]]:
    runners = peers()
    rates: Dict[float, Dict[str, List[float]]] = {ms: {name: [] for name in runners} for ms in sizes}
    for _ in range(rounds):
        for ms, count in sizes.items():
            for name, runner in runners.items():
                items = [ms] * (max(50, count // 10) if name == SLOW else count)
                started = time.perf_counter()
                runner(items)
                rates[ms][name].append(len(items) / (time.perf_counter() - started))
    return rates


def report(rates: Dict[float, Dict[str, List[float]]], sizes: Dict[float, int]) -> None:
    for ms, by_name in rates.items():
        print(f"items of {ms:g} ms CPU: {sizes[ms]} items\n")
        print("| runner | items/s (median) | bgtask / it (median of rounds) |")
        print("|---|---|---|")
        for name, values in by_name.items():
            ratios = [a / b for a, b in zip(by_name[OURS], values)]
            print(f"| {name} | {statistics.median(values):,.0f} | {statistics.median(ratios):.2f}x |")
        print()


def chart(rates: Dict[float, Dict[str, List[float]]], path: str) -> None:
    """Throughput against item size, one line a runner (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    sizes = sorted(rates)
    palette = iter(["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"])
    for name in rates[sizes[0]]:
        values = [statistics.median(rates[ms][name]) for ms in sizes]
        style: Dict[str, object] = {"color": next(palette)}
        if name == OURS:
            style = {"color": "#d62728", "linewidth": 2.5}
        elif name == RAW:
            style = {"color": "black", "linestyle": "--"}
        ax.plot([str(int(ms)) for ms in sizes], values, marker="o", label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel("CPU work per item, ms")
    ax.set_ylabel(f"items per second on {WORKERS} cores (median, log scale)")
    ax.set_title("map: throughput against the work per item (one interleaved run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(total: int) -> None:
    """The main program's RSS while ``map`` reads ``total`` lazily produced items."""

    def produce() -> Iterator[float]:
        for _ in range(total):
            yield 0.0

    samples: List[float] = []
    step = max(1, total // 20)
    started = time.perf_counter()
    for i, _ in enumerate(bg_burn.map(produce(), limit=WORKERS)):
        if i == step:
            base = rss_mib()  # past the start: the zygote's client, the monitor, the window
        if i % step == 0:
            samples.append(rss_mib())
    elapsed = time.perf_counter() - started
    later = samples[1:]
    growth = max(later) - base
    half = len(later) // 2
    trend = statistics.mean(later[half:]) - statistics.mean(later[:half])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{total:,} lazy no-op items in {elapsed:.0f} s ({total / elapsed:,.0f}/s)")
    print(f"RSS after the first {step:,} items: {base:.1f} MiB; largest growth after that: {growth:.2f} MiB")
    print(f"second half's mean minus first half's: {trend:+.2f} MiB; peak RSS {peak:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="0,1,5,20", help="item sizes in ms, comma-separated")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the item counts")
    parser.add_argument("--chart", metavar="PNG", help="also draw throughput against item size")
    parser.add_argument("--memory", type=int, metavar="N", help="only: RSS over a lazy map of N items")
    args = parser.parse_args()
    multiprocessing.set_start_method("fork")
    bg_burn(0).result()  # the zygote starts once, outside the clock
    if args.memory:
        memory(args.memory)
        return
    sizes = {float(ms): max(50, int(ITEMS.get(float(ms), 1000) * args.scale)) for ms in args.sizes.split(",")}
    rates = measure(args.rounds, sizes)
    print(f"{args.rounds} rounds, {WORKERS} workers, python {sys.version.split()[0]}\n")
    report(rates, sizes)
    if args.chart:
        chart(rates, args.chart)


if __name__ == "__main__":
    main()

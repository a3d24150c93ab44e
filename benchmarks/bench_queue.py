"""bgtask.Queue's throughput against multiprocessing's queues: items per second, 1 KiB each.

One producer, one consumer, both ways (main program to task, task to main program), for:

- ``bgtask.Queue`` with bgtask tasks (default start method);
- ``multiprocessing.Queue`` with ``multiprocessing.Process`` (fork);
- a ``multiprocessing.Manager().Queue()`` proxy, with ``multiprocessing.Process`` (fork).

The clock runs from the start of the producing loop to the last item read. Rounds alternate
the queues; the table gives medians over rounds and the median of the ratios within each round
(bgtask / multiprocessing.Queue). The machines are shared and noisy: compare ratios.

    python benchmarks/bench_queue.py            # --rounds 7 --items 50000
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from typing import Any, Callable, Dict, List

import bgtask

ITEM = b"x" * 1024


def _consume(q: Any, n: int) -> None:
    for _ in range(n):
        q.get()


def _produce(q: Any, n: int) -> None:
    for _ in range(n):
        q.put(ITEM)


consume_task = bgtask.background(_consume)
produce_task = bgtask.background(_produce)


def bgtask_to_task(n: int) -> float:
    q: bgtask.Queue[bytes] = bgtask.Queue()
    started = time.perf_counter()
    task = consume_task(q, n)
    for _ in range(n):
        q.put(ITEM)
    task.result(600)
    return n / (time.perf_counter() - started)


def bgtask_from_task(n: int) -> float:
    q: bgtask.Queue[bytes] = bgtask.Queue()
    started = time.perf_counter()
    task = produce_task(q, n)
    for _ in range(n):
        q.get()
    task.result(600)
    return n / (time.perf_counter() - started)


def _mp_to_task(make: Callable[[], Any]) -> Callable[[int], float]:
    def run(n: int) -> float:
        q = make()
        started = time.perf_counter()
        process = multiprocessing.Process(target=_consume, args=(q, n))
        process.start()
        for _ in range(n):
            q.put(ITEM)
        process.join()
        return n / (time.perf_counter() - started)

    return run


def _mp_from_task(make: Callable[[], Any]) -> Callable[[int], float]:
    def run(n: int) -> float:
        q = make()
        started = time.perf_counter()
        process = multiprocessing.Process(target=_produce, args=(q, n))
        process.start()
        for _ in range(n):
            q.get()
        process.join()
        return n / (time.perf_counter() - started)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--items", type=int, default=50_000)
    args = parser.parse_args()
    multiprocessing.set_start_method("fork")
    manager = multiprocessing.Manager()
    manager_items = max(1000, args.items // 10)  # a manager is ten times slower: fewer items
    variants: Dict[str, Callable[[int], float]] = {
        "bgtask.Queue, main -> task": bgtask_to_task,
        "multiprocessing.Queue, main -> task": _mp_to_task(multiprocessing.Queue),
        "Manager().Queue(), main -> task": _mp_to_task(manager.Queue),
        "bgtask.Queue, task -> main": bgtask_from_task,
        "multiprocessing.Queue, task -> main": _mp_from_task(multiprocessing.Queue),
        "Manager().Queue(), task -> main": _mp_from_task(manager.Queue),
    }
    bgtask_to_task(1000)  # the zygote starts once, outside the clock
    samples: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            samples[name].append(run(manager_items if name.startswith("Manager") else args.items))
    manager.shutdown()

    print(f"{args.rounds} rounds, {args.items} items of 1 KiB, one producer and one consumer\n")
    print("| queue, direction | items/s (median) |")
    print("|---|---|")
    for name, values in samples.items():
        print(f"| {name} | {statistics.median(values):,.0f} |")
    print()
    for direction in ("main -> task", "task -> main"):
        ours = samples[f"bgtask.Queue, {direction}"]
        for peer in ("multiprocessing.Queue", "Manager().Queue()"):
            theirs = samples[f"{peer}, {direction}"]
            ratios = sorted(a / b for a, b in zip(ours, theirs))
            print(
                f"bgtask.Queue / {peer}, {direction}: {statistics.median(ratios):.2f}x "
                f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})"
            )


if __name__ == "__main__":
    main()

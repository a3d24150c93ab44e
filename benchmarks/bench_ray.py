"""The Ray backend against the local one and against plain ``@ray.remote``: latency, throughput
and memory of the main program.

One program, a private local Ray cluster (``bgtask.use_ray()``), rounds alternating the three:
bgtask's local backend, bgtask's Ray backend, and the same function as a plain Ray task on the
same cluster (``ray.get(f.remote())``). Medians; the machines are shared and noisy, so compare
the ratios. A queue's rate: the main program puts ``--items`` small items that one task gets,
through a ``bgtask.Queue`` (local, and on Ray) and through Ray's own ``ray.util.queue.Queue``.

    pip install -e '.[ray]'
    python benchmarks/bench_ray.py            # --rounds 5 --calls 200 --burst 100 --items 1000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import bgtask


def noop() -> None:
    return None


def drain(q: Any, n: int) -> int:
    for _ in range(n):
        q.get()
    return n


class _PlainRay:
    """A plain Ray task's reference, with the one method the rounds use."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def result(self) -> Any:
        import ray

        return ray.get(self.ref)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tree_rss_mib() -> float:
    """RSS of every process descended from this one: the zygote, or a private Ray cluster."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(name))
    total, todo = 0.0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--items", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    fns: Dict[str, Callable[[], Any]] = {
        "local": bgtask.background(noop, backend="local"),
        "ray": bgtask.background(noop, backend="ray"),
    }
    before = rss_mib()
    fns["local"]().result()
    after_local = rss_mib()
    local_tree = tree_rss_mib()
    started = time.perf_counter()
    bgtask.use_ray(num_cpus=os.cpu_count() or 1)
    fns["ray"]().result()
    first_ray = time.perf_counter() - started
    after_ray = rss_mib()
    ray_tree = tree_rss_mib() - local_tree
    import ray

    plain = ray.remote(max_retries=0)(noop)  # bgtask's Ray tasks are not retried either
    fns["plain"] = lambda: _PlainRay(plain.remote())
    fns["plain"]().result()
    from ray.util.queue import Queue as RayQueue

    drains: Dict[str, Callable[[Any], Any]] = {
        "local": lambda q: bgtask.background(drain, backend="local")(q, args.items),
        "ray": lambda q: bgtask.background(drain, backend="ray")(q, args.items),
        "plain": lambda q: _PlainRay(ray.remote(max_retries=0)(drain).remote(q, args.items)),
    }
    queues: Dict[str, Callable[[], Any]] = {
        "local": lambda: bgtask.Queue(backend="local"),
        "ray": lambda: bgtask.Queue(backend="ray"),
        "plain": lambda: RayQueue(actor_options={"num_cpus": 0}),
    }
    latency: Dict[str, List[float]] = {name: [] for name in fns}
    burst: Dict[str, List[float]] = {name: [] for name in fns}
    through: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name in fns:
            q = queues[name]()
            t0 = time.perf_counter()
            consumer = drains[name](q)
            for i in range(args.items):
                q.put(i)
            consumer.result()
            through[name].append(args.items / (time.perf_counter() - t0))
        for name, fn in fns.items():
            for _ in range(args.calls):
                t0 = time.perf_counter()
                fn().result()
                latency[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for task in [fn() for _ in range(args.burst)]:
                task.result()
            burst[name].append(args.burst / (time.perf_counter() - t0))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.rounds} rounds\n")
    print("| measure | local | Ray | plain Ray | Ray / local | Ray / plain Ray |")
    print("|---|---|---|---|---|---|")
    lat = {name: statistics.median(values) * 1e3 for name, values in latency.items()}
    rate = {name: statistics.median(values) for name, values in burst.items()}
    print(
        f"| no-op call-to-result latency, ms (median) | {lat['local']:.2f} | {lat['ray']:.2f} | "
        f"{lat['plain']:.2f} | {lat['ray'] / lat['local']:.2f}x | {lat['ray'] / lat['plain']:.2f}x |"
    )
    print(
        f"| burst of {args.burst} no-op tasks, tasks/s | {rate['local']:,.0f} | {rate['ray']:,.0f} | "
        f"{rate['plain']:,.0f} | {rate['ray'] / rate['local']:.2f}x | {rate['plain'] / rate['ray']:.2f}x |"
    )
    items = {name: statistics.median(values) for name, values in through.items()}
    print(
        f"| a queue, main program to a task: {args.items} items, items/s | {items['local']:,.0f} | "
        f"{items['ray']:,.0f} | {items['plain']:,.0f} | {items['ray'] / items['local']:.2f}x | "
        f"{items['plain'] / items['ray']:.2f}x |"
    )
    growth = (after_local - before, after_ray - after_local)
    print(f"| main program's RSS growth, MiB | {growth[0]:.1f} | {growth[1]:.1f} | | | |")
    print(
        f"| processes started for it (zygote / private cluster), RSS MiB | {local_tree:.0f} | "
        f"{ray_tree:.0f} | | | |"
    )
    print(f"\nFirst Ray task, cluster start included: {first_ray:.1f} s")


if __name__ == "__main__":
    main()

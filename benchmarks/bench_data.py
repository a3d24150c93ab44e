"""What moving a large NumPy array into and out of a task costs, beyond the work itself.

For each size (200 MiB and 1 GiB by default), in one interleaved run of R rounds, medians:

- the argument's cost: a task that reads one value per page of the array, minus the same task
  given a tiny array (the work and the task's start cancel out);
- the result's cost: a task that creates the array and returns it, with the caller reading one
  value per page, minus a task that creates it and returns one number;
- the same for a warmed ``ProcessPoolExecutor(1)`` worker (fork), and one ``memcpy`` of the
  array into memory already touched (the floor);
- on Ray, when it is installed: ``ray.put`` + a task that reads it + ``ray.get`` of a number,
  and a task that returns the array with ``ray.get`` reading it, on a private local cluster
  (Ray hands out read-only arrays); and the same tasks of bgtask's on that cluster (writable
  arrays: each copied once out of Ray's object store).

Then the main program's peak resident memory while a task reads a 1 GiB argument, against the
array's own size (in a fresh interpreter, so nothing else counts).

    python benchmarks/bench_data.py                   # --sizes 200 1024 --rounds 5 [--no-ray]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, List

import numpy as np

import bgtask

MiB = 1 << 20


def touch(a: Any) -> float:
    return float(a[:: 4096 // a.itemsize].sum())


def make(nbytes: int) -> Any:
    a = np.empty(nbytes // 8, dtype=np.float64)
    a[:] = 1.0
    return a


def make_sum(nbytes: int) -> float:
    return touch(make(nbytes))


def timed(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


def measure(nbytes: int, rounds: int, use_ray: bool) -> Dict[str, float]:
    btouch, bmake, bmake_sum = bgtask.background(touch), bgtask.background(make), bgtask.background(make_sum)
    data, tiny = make(nbytes), make(4096)
    target = np.empty_like(data)
    target[:] = 0.0  # touched: the memcpy floor pays no page faults
    btouch(tiny).result()
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    pool.submit(touch, tiny).result()
    runs: Dict[str, Callable[[], object]] = {
        "bgtask arg": lambda: btouch(data).result(),
        "bgtask arg0": lambda: btouch(tiny).result(),
        "bgtask result": lambda: touch(bmake(nbytes).result()),
        "bgtask result0": lambda: bmake_sum(nbytes).result(),
        "PPE arg": lambda: pool.submit(touch, data).result(),
        "PPE arg0": lambda: pool.submit(touch, tiny).result(),
        "PPE result": lambda: touch(pool.submit(make, nbytes).result()),
        "PPE result0": lambda: pool.submit(make_sum, nbytes).result(),
        "memcpy": lambda: np.copyto(target, data),
    }
    if use_ray:
        import ray

        rtouch, rmake, rmake_sum = (ray.remote(f) for f in (touch, make, make_sum))
        ray.get(rtouch.remote(tiny))
        on_ray = [bgtask.background(f, backend="ray") for f in (touch, make, make_sum)]
        gtouch, gmake, gmake_sum = on_ray
        gtouch(tiny).result()
        runs.update(
            {
                "bgtask on Ray arg": lambda: gtouch(data).result(),
                "bgtask on Ray arg0": lambda: gtouch(tiny).result(),
                "bgtask on Ray result": lambda: touch(gmake(nbytes).result()),
                "bgtask on Ray result0": lambda: gmake_sum(nbytes).result(),
                "Ray arg": lambda: ray.get(rtouch.remote(ray.put(data))),
                "Ray arg0": lambda: ray.get(rtouch.remote(ray.put(tiny))),
                "Ray result": lambda: touch(ray.get(rmake.remote(nbytes))),
                "Ray result0": lambda: ray.get(rmake_sum.remote(nbytes)),
            }
        )
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(timed(run))
    pool.shutdown()
    return {name: statistics.median(values) for name, values in times.items()}


PEAK = r"""
import sys
import numpy as np
import bgtask

def touch(a):
    return float(a[:: 4096 // a.itemsize].sum())

if __name__ == "__main__":
    nbytes = int(sys.argv[1])
    a = np.empty(nbytes // 8)
    a[:] = 1.0
    bgtask.background(touch)(a).result()
    # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec, on Linux).
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    print(peak / nbytes)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1024], help="MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    # First, in a fresh interpreter, before this one holds gigabytes.
    ratio = subprocess.run(
        [sys.executable, "-c", PEAK, str(1024 * MiB)], capture_output=True, text=True, check=True
    ).stdout.strip()
    use_ray = False
    if not args.no_ray:
        try:
            import ray

            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
            use_ray = True
        except ImportError:
            pass
    print(f"Python {sys.version.split()[0]}, {args.rounds} rounds, medians (ms)\n")
    print("| array | who | moving it in | moving it out |")
    print("|---|---|---|---|")
    for mib in args.sizes:
        m = measure(mib * MiB, args.rounds, use_ray)
        floor = m["memcpy"]
        cost = {}
        for who in ("bgtask", "PPE", *(["Ray", "bgtask on Ray"] if use_ray else [])):
            arg = max(m[f"{who} arg"] - m[f"{who} arg0"], 0.001)
            res = max(m[f"{who} result"] - m[f"{who} result0"], 0.001)
            cost[who] = (arg, res)
        for who, (arg, res) in cost.items():
            ppe_arg, ppe_res = cost["PPE"]
            print(
                f"| {mib} MiB | {who} | {arg:.0f} ms ({ppe_arg / arg:.1f}x faster than PPE, "
                f"{arg / floor:.1f}x memcpy) | {res:.0f} ms ({ppe_res / res:.1f}x faster than PPE, "
                f"{res / floor:.1f}x memcpy) |"
            )
        print(f"| {mib} MiB | one memcpy | {floor:.0f} ms | |")
    print(f"\nThe main program's peak resident memory with a 1 GiB argument: {float(ratio):.2f}x the array")


if __name__ == "__main__":
    main()

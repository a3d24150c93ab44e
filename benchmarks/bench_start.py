"""Start-up cost of a task, against the peers, measured interleaved in one run.

    python benchmarks/bench_start.py [--rounds N] [--quick] [--out DIR]

Measures, for each way of running ``f()`` in a new process (or a reused worker), the latency
from the call until the result is back in the caller. Cleanup (joining, reaping) happens after
each timed call and outside the timing, for every method alike. Methods run round-robin in a
shuffled order each round, so that a noisy neighbour on the machine hits all of them alike.

Then, in the same run: the same latency with 1 GiB allocated in the main program, the throughput
of a burst of 200 tasks, the memory a task process uses of its own (USS), the import time of
bgtask against cloudpickle, and how soon a daemon task is gone after its main program ends or is
SIGKILLed. Prints a table of medians, p90 and ratios; writes ``results.json`` and ``start.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

# Heavy imports (bgtask, cloudpickle, the peers) happen inside functions: under spawn and
# forkserver, multiprocessing imports this main module again in every child, and that must not
# cost the peers more than their own machinery does.

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def noop() -> None:
    return None


# -- the ways to run noop() ------------------------------------------------------------------


def _fork_noop() -> Tuple[int, int]:
    """Fork a child that sends noop()'s pickled result down a pipe; (pid, read end)."""
    import cloudpickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, cloudpickle.dumps(noop()))
        os._exit(0)
    os.close(w)
    return pid, r


def _read_result(r: int) -> None:
    import cloudpickle

    with os.fdopen(r, "rb") as f:
        cloudpickle.loads(f.read())


def raw_fork() -> Callable[[], None]:
    """The floor: os.fork, a pipe for the result, waitpid."""

    def run() -> None:
        pid, r = _fork_noop()
        _read_result(r)
        _pending.append(lambda: os.waitpid(pid, 0))

    return run


_pending: List[Callable[[], Any]] = []


def _mp_target(conn: Any, payload: bytes) -> None:
    import cloudpickle

    fn = cloudpickle.loads(payload)
    conn.send(fn())
    conn.close()


def mp_method(method: str) -> Callable[[], None]:
    """multiprocessing.Process with a Pipe back; the function travels with cloudpickle."""
    import cloudpickle

    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # What an informed user does: the server imports cloudpickle once, not every child.
        ctx.set_forkserver_preload(["__main__", "cloudpickle"])
    payload = cloudpickle.dumps(noop)

    def run() -> None:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_mp_target, args=(child, payload))
        proc.start()
        child.close()
        parent.recv()
        parent.close()
        _pending.append(lambda: (proc.join(), proc.close()))

    return run


def pebble_default() -> Callable[[], None]:
    from pebble import concurrent

    fn = concurrent.process(noop)

    def run() -> None:
        fn().result()

    return run


def ppe_reused() -> Callable[[], None]:
    from concurrent.futures import ProcessPoolExecutor

    executor = ProcessPoolExecutor(max_workers=1)
    executor.submit(noop).result()
    _closers.append(executor.shutdown)

    def run() -> None:
        executor.submit(noop).result()

    return run


def loky_reused() -> Callable[[], None]:
    from loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=1)
    executor.submit(noop).result()

    def run() -> None:
        executor.submit(noop).result()

    return run


def bgtask_method(start_method: Optional[str] = None) -> Callable[[], None]:
    import bgtask

    fn = bgtask.background(start_method=start_method)(noop)
    fn().join()

    def run() -> None:
        task = fn()
        task.result()
        _pending.append(task.join)

    return run


_closers: List[Callable[[], Any]] = []


def _cleanup() -> None:
    while _pending:
        _pending.pop()()


# -- measurements ----------------------------------------------------------------------------


def latency(methods: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, List[float]]:
    samples: Dict[str, List[float]] = {name: [] for name in methods}
    names = list(methods)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            gc.collect()
            start = time.perf_counter()
            methods[name]()
            samples[name].append(time.perf_counter() - start)
            _cleanup()
    return samples


def burst(methods: Dict[str, Callable[[int], None]], repeats: int) -> Dict[str, List[float]]:
    """Tasks per second for a burst of 200 started at once."""
    samples: Dict[str, List[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name in random.sample(list(methods), len(methods)):
            start = time.perf_counter()
            methods[name](200)
            samples[name].append(200 / (time.perf_counter() - start))
    return samples


def burst_raw_fork(n: int) -> None:
    started = [_fork_noop() for _ in range(n)]
    for pid, r in started:
        _read_result(r)
        os.waitpid(pid, 0)


def burst_bgtask(n: int) -> None:
    import bgtask

    fn = bgtask.background(noop)
    tasks = [fn() for _ in range(n)]
    for task in tasks:
        task.result()
    for task in tasks:
        task.join()


def burst_mp_fork(n: int) -> None:
    import cloudpickle

    ctx = multiprocessing.get_context("fork")
    payload = cloudpickle.dumps(noop)
    started = []
    for _ in range(n):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_mp_target, args=(child, payload))
        proc.start()
        child.close()
        started.append((proc, parent))
    for proc, parent in started:
        parent.recv()
        parent.close()
        proc.join()
        proc.close()


def burst_pebble(n: int) -> None:
    from pebble import concurrent

    fn = concurrent.process(noop)
    futures = [fn() for _ in range(n)]
    for future in futures:
        future.result()


def uss_of_task(kind: str) -> float:
    """USS (MiB) of a task process that sleeps, measured from outside with psutil."""
    import psutil

    import bgtask

    def sleeper() -> None:
        time.sleep(30)

    if kind == "bgtask":
        task = bgtask.background(sleeper)()
        pid = task.pid
        assert pid is not None
        time.sleep(0.3)
        uss = psutil.Process(pid).memory_full_info().uss
        task.kill()
        task.join()
    elif kind == "raw fork":
        pid = os.fork()
        if pid == 0:
            sleeper()
            os._exit(0)
        time.sleep(0.3)
        uss = psutil.Process(pid).memory_full_info().uss
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    else:
        ctx = multiprocessing.get_context(kind.split()[1])
        proc = ctx.Process(target=time.sleep, args=(30,))
        proc.start()
        time.sleep(0.3 if kind.split()[1] == "fork" else 1.0)
        assert proc.pid is not None
        uss = psutil.Process(proc.pid).memory_full_info().uss
        proc.kill()
        proc.join()
        proc.close()
    return uss / 2**20


def import_time(module: str, repeats: int) -> List[float]:
    samples = []
    for _ in range(repeats):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import time; s = time.perf_counter(); import {module}; print(time.perf_counter() - s)",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=str(ROOT),
        )
        samples.append(float(out.stdout))
    return samples


STOP_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    sys.path.insert(0, {root!r})
    {setup}
    print(pid, flush=True)
    if sys.argv[1] == "kill":
        threading.Event().wait()
    """
)

STOP_SETUPS = {
    "bgtask": "from bgtask import background\n"
    "t = background(daemon=True)(time.sleep)(3600); pid = t.pid; time.sleep(0.2)",
    "mp fork daemon": "import multiprocessing as mp\n"
    "p = mp.get_context('fork').Process(target=time.sleep, args=(3600,), daemon=True); p.start(); "
    "pid = p.pid; time.sleep(0.2)",
    "pebble": "from pebble import concurrent\n"
    "f = concurrent.process(daemon=True)(time.sleep)(3600); "
    "pid = __import__('multiprocessing').active_children()[0].pid; time.sleep(0.2)",
}


def stop_latency(kind: str, how: str, repeats: int) -> List[float]:
    """Seconds from the main program's end (or SIGKILL) until its daemon task is gone."""
    samples = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "main.py"
            script.write_text(STOP_SCRIPT.format(root=str(ROOT), setup=STOP_SETUPS[kind]))
            proc = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            pid = int(proc.stdout.readline())
            pidfd = os.pidfd_open(pid)
            if how == "kill":
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            ended = time.perf_counter()
            ready, _, _ = select.select([pidfd], [], [], 3.0)
            samples.append(time.perf_counter() - ended if ready else float("inf"))
            if not ready:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os.close(pidfd)
            proc.stdout.close()
    return samples


# -- report ----------------------------------------------------------------------------------


def summary(samples: List[float]) -> Tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


def table(
    title: str, rows: Dict[str, List[float]], unit: str, scale: float, base: Optional[str]
) -> List[str]:
    lines = [f"\n{title}", f"| method | median {unit} | p90 {unit} | ratio |", "|---|---|---|---|"]
    base_median = summary(rows[base])[0] if base else None
    for name, samples in sorted(rows.items(), key=lambda kv: summary(kv[1])[0]):
        median, p90 = summary(samples)
        ratio = f"{median / base_median:.2f}x" if base_median else ""
        lines.append(f"| {name} | {median * scale:.2f} | {p90 * scale:.2f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    parser.add_argument("--chart", metavar="RESULTS_JSON", help="only redraw the chart from a run")
    args = parser.parse_args()
    if args.chart:
        chart(json.loads(Path(args.chart).read_text()), Path(args.out) / "start.png")
        return
    rounds = 20 if args.quick else args.rounds
    repeats = 3 if args.quick else 10
    out = Path(args.out)
    results: Dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    lines = [f"python {results['python']}, {results['cpus']} CPUs, {rounds} rounds, medians"]

    methods: Dict[str, Callable[[], None]] = {
        "raw fork + pipe": raw_fork(),
        "bgtask (default)": bgtask_method(),
        "multiprocessing fork": mp_method("fork"),
        "multiprocessing forkserver": mp_method("forkserver"),
        "multiprocessing spawn + cloudpickle": mp_method("spawn"),
        "pebble (default)": pebble_default(),
        "ProcessPoolExecutor, reused worker": ppe_reused(),
        "loky, reused worker": loky_reused(),
    }
    lat = latency(methods, rounds)
    results["latency"] = lat
    lines += table("Call-to-result latency of a no-op task", lat, "ms", 1e3, "raw fork + pipe")

    ballast = bytearray(2**30)  # 1 GiB, touched so that it is really mapped
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    big = latency({"raw fork + pipe": raw_fork(), "bgtask (default)": bgtask_method()}, max(20, rounds // 4))
    del ballast
    gc.collect()
    results["latency_1gib"] = big
    lines += table("Same, with 1 GiB allocated in the main program", big, "ms", 1e3, "raw fork + pipe")
    small_bg = summary(lat["bgtask (default)"])[0]
    lines.append(f"bgtask with 1 GiB / without: {summary(big['bgtask (default)'])[0] / small_bg:.2f}x")

    bursts = burst(
        {
            "raw fork + pipe": burst_raw_fork,
            "bgtask (default)": burst_bgtask,
            "multiprocessing fork": burst_mp_fork,
            "pebble (default)": burst_pebble,
        },
        repeats,
    )
    results["burst"] = bursts
    lines.append("\nBurst of 200 tasks: tasks per second (higher is better; p90: of the burst's duration)")
    lines.append("| method | median tasks/s | p90 tasks/s | ratio to raw fork |")
    lines.append("|---|---|---|---|")
    base = statistics.median(bursts["raw fork + pipe"])
    for name, samples in sorted(bursts.items(), key=lambda kv: -statistics.median(kv[1])):
        median = statistics.median(samples)
        slow = sorted(samples)[int(len(samples) * 0.1)]  # the rate of the 90th-percentile duration
        lines.append(f"| {name} | {median:.0f} | {slow:.0f} | {median / base:.2f}x |")

    uss = {
        kind: [uss_of_task(kind) for _ in range(3)]
        for kind in ("bgtask", "raw fork", "multiprocessing fork", "multiprocessing spawn")
    }
    results["uss_mib"] = uss
    lines.append("\nMemory of a task process of its own (USS, MiB)")
    lines.append("| method | median MiB |")
    lines.append("|---|---|")
    for name, samples in uss.items():
        lines.append(f"| {name} | {statistics.median(samples):.2f} |")

    imports = {m: import_time(m, repeats * 2) for m in ("cloudpickle", "bgtask")}
    results["import_s"] = imports
    lines += table("Import time", imports, "ms", 1e3, "cloudpickle")

    stops = {}
    for kind in STOP_SETUPS:
        for how in ("end", "kill"):
            stops[f"{kind}, main {'returns' if how == 'end' else 'SIGKILLed'}"] = stop_latency(
                kind, how, repeats
            )
    results["stop_s"] = stops
    lines.append("\nDaemon task gone after the main program ends (inf: still alive after 3 s)")
    lines.append("| method | median ms | p90 ms |")
    lines.append("|---|---|---|")
    for name, samples in stops.items():
        median, p90 = summary(samples)
        lines.append(f"| {name} | {median * 1e3:.1f} | {p90 * 1e3:.1f} |")

    for close in _closers:
        close()
    report = "\n".join(lines)
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report + "\n")
    chart(results, out / "start.png")


def chart(results: Dict[str, Any], path: Path) -> None:
    """Three panels: latency against every peer, latency with a 1 GiB parent, burst throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, big, bursts = results["latency"], results["latency_1gib"], results["burst"]
    fig, axes = plt.subplots(
        3, 1, figsize=(9, 8.5), gridspec_kw={"height_ratios": [len(lat), len(big) + 0.6, len(bursts)]}
    )
    _latency_panel(axes[0], lat, "call-to-result latency of a no-op task, ms (log scale, lower is better)")
    axes[0].set_title("Starting a task: bgtask against its peers (one interleaved run)")
    _latency_panel(axes[1], big, "the same with 1 GiB allocated in the main program, ms (log scale)")
    names = sorted(bursts, key=lambda n: statistics.median(bursts[n]))
    rates = [statistics.median(bursts[n]) for n in names]
    base = statistics.median(bursts["raw fork + pipe"])
    axes[2].barh(names, rates, color=[_color(n) for n in names])
    for y, rate in enumerate(rates):
        axes[2].text(rate * 1.02, y, f"{rate:.0f}/s ({rate / base:.2f}x raw fork)", va="center", fontsize=8)
    axes[2].set_xlim(right=max(rates) * 1.45)
    axes[2].set_xlabel("burst of 200 tasks on 2 cores: tasks per second, median (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nchart: {path}")


def _color(name: str) -> str:
    return "#d62728" if name.startswith("bgtask") else "#7f7f7f"


def _latency_panel(ax: Any, lat: Dict[str, List[float]], label: str) -> None:
    names = sorted(lat, key=lambda n: summary(lat[n])[0], reverse=True)
    medians = [summary(lat[n])[0] * 1e3 for n in names]
    p90s = [summary(lat[n])[1] * 1e3 for n in names]
    ax.barh(names, medians, color=[_color(n) for n in names], label="median")
    ax.scatter(p90s, names, color="black", marker="|", s=200, label="p90", zorder=3)
    for y, (m, p) in enumerate(zip(medians, p90s)):
        ax.text(max(m, p) * 1.08, y, f"{m:.2f} ms", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=max(p90s) * 3)
    ax.set_xlabel(label)
    ax.legend(loc="upper right", fontsize=8)


if __name__ == "__main__":
    main()

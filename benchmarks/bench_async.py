"""How long starting tasks from a coroutine keeps an asyncio event loop from running.

Two measures, for ``await fn.astart(arg)`` and for a plain call ``fn(arg)`` made in the loop:

- **loop thread's own work**: the longest single step the loop ran for the start, in CPU time
  of the loop's thread (``time.thread_time``): work done in the loop, which nothing but the
  library can shorten;
- **heartbeat lag**: a coroutine spins on ``await asyncio.sleep(0)`` and records the longest
  gap between two of its turns while the starts run. This also counts the GIL held by other
  threads and the operating system giving the CPU to another process. On a machine with few
  cores the latter dominates, so the same heartbeat is measured while a *separate* program
  starts the same number of tasks: the lag the machine alone causes.

    python benchmarks/bench_async.py          # --calls 50 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable, Dict, List, Tuple

import bgtask


@bgtask.background
def noop(arg: Any = None) -> None:
    return None


class StepTimer:
    """The longest loop step (callback) by CPU time of the loop thread."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._original: Any = None

    def __enter__(self) -> StepTimer:
        handle = asyncio.events.Handle
        original = self._original = handle._run

        def run(h: Any) -> None:
            start = time.thread_time()
            try:
                original(h)
            finally:
                self.longest = max(self.longest, time.thread_time() - start)

        handle._run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]


async def _heartbeat(lags: List[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0)
        lags.append(time.perf_counter() - before)


async def _measure(start: Callable[[], Awaitable[Any]], calls: int) -> Tuple[float, float]:
    """(longest loop step in CPU s, longest heartbeat gap in s) over ``calls`` starts."""
    lags: List[float] = []
    stop = asyncio.Event()
    beat = asyncio.ensure_future(_heartbeat(lags, stop))
    await asyncio.sleep(0.01)
    lags.clear()
    tasks = []
    with StepTimer() as steps:

        async def starts() -> None:
            for _ in range(calls):
                tasks.append(await start())
                await asyncio.sleep(0)  # each start in a step of its own

        await asyncio.ensure_future(starts())  # its steps run with the timer in place
    stop.set()
    await beat
    for task in tasks:
        await task
    return steps.longest, max(lags)


def _machine_lag(calls: int, size: int) -> float:
    """The heartbeat's longest gap while another program starts ``calls`` tasks."""
    code = (
        "import bgtask\n@bgtask.background\ndef noop(arg=None): pass\n"
        f"arg = b'x' * {size} if {size} else None\nnoop().result()\n"
        "import sys; sys.stdout.write('go\\n'); sys.stdout.flush()\n"
        f"for _ in range({calls}): noop(arg).result()\n"
    )

    async def run() -> float:
        lags: List[float] = []
        stop = asyncio.Event()
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
        beat = asyncio.ensure_future(_heartbeat(lags, stop))
        while proc.poll() is None:
            await asyncio.sleep(0.005)
        stop.set()
        await beat
        return max(lags)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = {"small argument": (0, args.calls), "50 MB argument": (50_000_000, 5)}
    rows: Dict[str, Dict[str, List[float]]] = {}
    for _ in range(args.rounds):
        for case, (size, calls) in cases.items():
            arg = b"x" * size if size else None

            async def astart(arg: Any = arg) -> Any:
                return await noop.astart(arg)

            async def inline(arg: Any = arg) -> Any:
                return noop(arg)

            async def both(calls: int = calls) -> Dict[str, Tuple[float, float]]:
                await noop.astart()  # the zygote and the executor's thread, outside the clock
                return {
                    "await fn.astart(arg)": await _measure(astart, calls),
                    "fn(arg) in the loop": await _measure(inline, calls),
                }

            for how, (step, lag) in asyncio.run(both()).items():
                row = rows.setdefault(f"{case}, {how}", {"step": [], "lag": [], "machine": []})
                row["step"].append(step)
                row["lag"].append(lag)
            machine = _machine_lag(calls, size)
            for how in ("await fn.astart(arg)", "fn(arg) in the loop"):
                rows[f"{case}, {how}"]["machine"].append(machine)
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds, medians of each round's maximum\n")
    print(
        "| start | longest loop step, CPU ms | heartbeat's longest gap, ms "
        "| same heartbeat, another program starting tasks, ms |"
    )
    print("|---|---|---|---|")
    for name, row in rows.items():
        step, lag, machine = (statistics.median(row[k]) * 1e3 for k in ("step", "lag", "machine"))
        print(f"| {name} | {step:.2f} | {lag:.2f} | {machine:.2f} |")


if __name__ == "__main__":
    main()

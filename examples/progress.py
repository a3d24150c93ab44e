"""A progress bar over a long task: the task yields its progress, the program shows it.

A generator function decorated with ``@background`` streams what it yields: the main program
iterates over the task while it runs, and ``result()`` is what the generator returned. With
tqdm installed (``pip install tqdm``), ``tqdm(task, total=n)`` draws the bar; without it, this
example prints every tenth step.

    python examples/progress.py
"""

import hashlib
from typing import Generator

from bgtask import background


@background
def checksum(blocks: int) -> Generator[int, None, str]:
    """Hash ``blocks`` blocks of data, yielding after each; return the digest."""
    digest = hashlib.sha256()
    block = bytes(range(256)) * 4096  # 1 MiB
    for i in range(blocks):
        digest.update(block)
        yield i + 1
    return digest.hexdigest()


if __name__ == "__main__":
    n = 200
    task = checksum(n)
    try:
        from tqdm import tqdm
    except ImportError:
        for done in task:
            if done % (n // 10) == 0:
                print(f"{done}/{n} blocks")
    else:
        for _ in tqdm(task, total=n, unit="block"):
            pass
    print(f"sha256 of {n} MiB: {task.result()[:16]}...")

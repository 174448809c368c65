"""Run measurements in child processes so that one the kernel kills (host memory) becomes a row, not the end.

transformers' offloaded cache at 256K was killed by the out-of-memory killer of a 128 GiB host; in-process, that
took the whole benchmark with it and left no row. Here a spawned child measures (system, context) pairs in order
and sends each finished row back; if it dies, the pair it was on is reported with its exit signal and a fresh
child takes the pairs left.
"""

from __future__ import annotations

import multiprocessing
import signal
from dataclasses import asdict
from typing import Callable, Iterator

from tierkv.bench.systems import Row

Pair = tuple[str, int]


def send_row(conn, row: Row) -> None:
    """Child side: hand one finished row to the parent."""
    conn.send(asdict(row))


def _death_reason(exitcode: int | None) -> tuple[str, str]:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode).name
        if -exitcode == signal.SIGKILL:
            return "oom", (f"the process measuring it was killed ({sig}), most likely by the kernel's out-of-memory "
                           "killer: host memory ran out")
        return "error", f"the process measuring it died of {sig}"
    return "error", f"the process measuring it exited with status {exitcode} before reporting"


def isolated_rows(pairs: list[Pair], worker: Callable, args: tuple = ()) -> Iterator[Row]:
    """Rows of `pairs` measured by worker(conn, pairs, *args) in spawned children, in order. The worker must send
    one row per pair with `send_row`, in the order given. Blocks; yields each row as it arrives."""
    ctx = multiprocessing.get_context("spawn")  # a forked child would inherit the parent's CUDA context
    left = list(pairs)
    while left:
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=worker, args=(send, left, *args), daemon=True)
        child.start()
        send.close()  # the child holds the only write end: EOF on recv means it finished or died
        done = 0
        while done < len(left):
            try:
                row = Row(**recv.recv())
            except EOFError:
                break
            done += 1
            yield row
        recv.close()
        child.join()
        left = left[done:]
        if left:
            status, reason = _death_reason(child.exitcode)
            system, context = left.pop(0)
            yield Row(system, context, status=status, reason=reason)

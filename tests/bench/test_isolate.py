"""isolated_rows: rows come back in order from a child process; a child killed mid-run (as the kernel's
out-of-memory killer does) becomes an 'oom' row for the pair it was on, and a fresh child measures the rest."""

import os
import signal

import pytest

from tierkv.bench.isolate import isolated_rows, send_row
from tierkv.bench.systems import Row


def _worker(conn, pairs, die_on):
    for system, context in pairs:
        if (system, context) == die_on:
            os.kill(os.getpid(), signal.SIGKILL)
        send_row(conn, Row(system, context, decode_ms={"median": float(context)}, settings={"pid": os.getpid()}))
    conn.close()


@pytest.mark.slow
def test_rows_come_back_in_order():
    pairs = [("a", 1), ("b", 1), ("a", 2)]
    rows = list(isolated_rows(pairs, _worker, (None,)))
    assert [(r.system, r.context, r.status) for r in rows] == [("a", 1, "ok"), ("b", 1, "ok"), ("a", 2, "ok")]
    assert rows[2].decode_ms == {"median": 2.0}
    assert len({r.settings["pid"] for r in rows}) == 1 and rows[0].settings["pid"] != os.getpid()


@pytest.mark.slow
def test_a_killed_child_becomes_an_oom_row_and_the_rest_still_run():
    pairs = [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    rows = list(isolated_rows(pairs, _worker, (("b", 1),)))
    assert [(r.system, r.context) for r in rows] == pairs
    assert [r.status for r in rows] == ["ok", "oom", "ok", "ok"]
    assert "SIGKILL" in rows[1].reason and "out-of-memory" in rows[1].reason
    assert rows[0].settings["pid"] != rows[2].settings["pid"]  # a fresh child took the pairs left

"""Staging ring and prefetcher: no buffer handed out while a copy out of it is in flight, no early reads."""

import threading
import time

import numpy as np
import pytest
import torch

from tierkv.errors import IntegrityError
from tierkv.io.prefetch import Prefetcher, Sources
from tierkv.io.staging import StagingRing

NB = 64  # bytes per chunk row


class FakeEvent:
    """A copy that stays in flight until synchronize() (or finish()) is called."""

    def __init__(self):
        self.finished, self.synced = False, 0

    def query(self):
        return self.finished

    def synchronize(self):
        self.synced += 1
        self.finished = True


def test_ring_waits_for_in_flight_copy_before_reuse():
    ring = StagingRing(2, NB, pin=False)
    a = ring.acquire()
    b = ring.acquire()
    with pytest.raises(RuntimeError, match="held"):
        ring.acquire()  # never hands out a held buffer
    ev = FakeEvent()
    ring.release(a, ev)
    again = ring.acquire()
    assert again is a and ev.synced == 1 and ring.waits == 1  # waited for the copy before reuse
    done = FakeEvent()
    done.finished = True
    ring.release(b, done)
    assert ring.acquire() is b and done.synced == 0  # a finished copy costs no wait
    with pytest.raises(RuntimeError, match="twice"):
        ring.release(a)
        ring.release(a)


def test_ring_hands_out_oldest_released_first():
    ring = StagingRing(3, NB, pin=False)
    bufs = [ring.acquire() for _ in range(3)]
    for i in (2, 0, 1):
        ring.release(bufs[i])
    assert [ring.acquire().index for _ in range(3)] == [2, 0, 1]


class SlowDisk:
    """Reads that take a while and record when they finished."""

    def __init__(self, delay=0.05):
        self.delay, self.finished, self.lock = delay, {}, threading.Lock()

    def __call__(self, key, buf: np.ndarray):
        time.sleep(self.delay)
        buf[:] = key % 251
        with self.lock:
            self.finished[key] = time.perf_counter()


def expect(key):
    return torch.full((NB,), key % 251, dtype=torch.uint8)


def make(ring_count=2, host_read="direct"):
    ring = StagingRing(ring_count, 4 * NB, pin=False)
    return Prefetcher("cpu", NB, ring, host_read=host_read, threads=3), ring


def test_consumer_sees_complete_rows_after_slow_reads():
    pf, ring = make()
    disk = SlowDisk()
    dev = torch.arange(8 * NB, dtype=torch.int64).remainder(256).to(torch.uint8).view(8, NB)
    host = (255 - dev).contiguous()
    dests = [torch.zeros(4, NB, dtype=torch.uint8) for _ in range(2)]
    src = Sources(device=dev, host=host, read_disk=disk)
    t1 = pf.prepare(dests[0], [3], [5], [101, 102], src)
    t2 = pf.prepare(dests[1], [], [0], [103, 104, 105], src)
    assert pf.in_flight == 2 and len(disk.finished) < 5  # returned before the slow reads ended
    rows = pf.complete(t1)
    t_done = time.perf_counter()
    assert all(disk.finished[k] <= t_done for k in (101, 102))
    assert torch.equal(rows[0], dev[3]) and torch.equal(rows[1], host[5])
    assert torch.equal(rows[2], expect(101)) and torch.equal(rows[3], expect(102))
    t3 = pf.prepare(dests[0][2:], [], [], [106], src)  # reuses t1's staging buffer after its copy
    rows2 = pf.complete(t2)
    assert torch.equal(rows2[0], host[0]) and all(torch.equal(rows2[i + 1], expect(k)) for i, k in enumerate([103, 104, 105]))
    assert torch.equal(pf.complete(t3)[0], expect(106))
    assert torch.equal(dests[0][1], host[5])  # t1's host row untouched by t3
    assert pf.bytes == {"device->device": NB, "host->device": 2 * NB, "disk->device": 6 * NB}
    assert ring.free == 2 and pf.in_flight == 0
    pf.close()


def test_no_staging_buffer_reused_while_ticket_open():
    pf, ring = make(ring_count=1)
    disk = SlowDisk(0.02)
    src = Sources(read_disk=disk)
    t1 = pf.prepare(torch.zeros(2, NB, dtype=torch.uint8), [], [], [1, 2], src)
    with pytest.raises(RuntimeError, match="held"):
        pf.prepare(torch.zeros(2, NB, dtype=torch.uint8), [], [], [3], src)
    assert torch.equal(pf.complete(t1)[1], expect(2))
    pf.close()


def test_copy_host_read_matches_direct():
    host = torch.randint(0, 256, (6, NB), dtype=torch.uint8)
    outs = []
    for mode in ("direct", "copy"):
        pf, _ = make(host_read=mode)
        t = pf.prepare(torch.zeros(3, NB, dtype=torch.uint8), [], [4, 0, 2], [], Sources(host=host))
        outs.append(pf.complete(t).clone())
        pf.close()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], host[[4, 0, 2]])


def test_read_error_surfaces_in_complete_and_frees_the_buffer():
    pf, ring = make(ring_count=1)

    def bad(key, buf):
        raise IntegrityError(f"chunk {key} failed its checksum")

    t = pf.prepare(torch.zeros(1, NB, dtype=torch.uint8), [], [], [7], Sources(read_disk=bad))
    with pytest.raises(IntegrityError, match="chunk 7"):
        pf.complete(t)
    assert ring.free == 1 and pf.in_flight == 0
    pf.close()


def test_fence_waits_for_reads_in_flight():
    pf, _ = make()
    disk = SlowDisk(0.05)
    pf.prepare(torch.zeros(2, NB, dtype=torch.uint8), [], [], [1, 2], Sources(read_disk=disk))
    pf.fence()
    assert set(disk.finished) == {1, 2}
    pf.close()

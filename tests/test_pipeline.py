"""qtool.pipeline: order, bounded memory, buffers never reused too early, errors from every stage, no threads left.

The engine runs here on the CPU with stage functions that sleep at random to shuffle the threads' timing; the GPU
test at the end sends real layers through a side stream and pinned slots and compares with a serial run.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time

import pytest
import torch

from helpers import assert_equal
from qtool import pipeline
from qtool.errors import QtoolError
from qtool.interrupts import Interrupted, handle_signals


def workers() -> list[str]:
    """The engine's threads still alive."""
    return [t.name for t in threading.enumerate() if t.name.startswith(("qtool-reader", "qtool-writer"))]


@pytest.fixture(autouse=True)
def no_threads_left():
    assert workers() == []
    yield
    assert workers() == [], "a stage thread outlived pipeline.run"


def jitter(rng: random.Random) -> None:
    time.sleep(rng.random() * 0.004)


def fill(slot: pipeline.Slot, item: int, n: int = 1000) -> torch.Tensor:
    """Read ``item``: n bytes of its own pattern into the slot's buffer."""
    buf = slot.take(n)
    buf.copy_(torch.arange(n, dtype=torch.int64).add_(item * 7).remainder_(251).to(torch.uint8))
    return buf


def pattern(item: int, n: int = 1000) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64).add_(item * 7).remainder_(251).to(torch.uint8)


def test_items_are_computed_and_written_in_order_with_the_slots_data():
    """Under random stage times, every item is computed and written once, in order, with the bytes its read put
    in the slot: the writer sees a view of the slot (no copy), so a slot reused too early would show here."""
    rng = random.Random(0)
    computed, written = [], []

    def read(item, slot):
        jitter(rng)
        return item, fill(slot, item)

    def compute(payload, slot):
        jitter(rng)
        computed.append(payload[0])
        return payload

    def write(result):
        item, data = result
        jitter(rng)
        assert_equal(data, pattern(item), f"item {item}")
        written.append(item)

    stats = pipeline.run(range(200), read=read, compute=compute, write=write, slot_bytes=4096, slots=3)
    assert computed == written == list(range(200))
    assert (stats.items, stats.slots, stats.slot_bytes) == (200, 3, 3 * 4096)
    assert stats.wall > 0 and min(stats.read, stats.compute, stats.write) > 0 and stats.wait == 0


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_items_in_flight_are_at_most_the_slots(slots):
    """Memory is bounded by the pool: no more than ``slots`` items exist between their read and their write, and
    no other slot is ever handed out."""
    rng = random.Random(slots)
    live, peak, seen = set(), [0], set()
    lock = threading.Lock()

    def read(item, slot):
        with lock:
            live.add(item)
            peak[0] = max(peak[0], len(live))
            seen.add(id(slot))
        jitter(rng)
        return item

    def write(item):
        jitter(rng)
        with lock:
            live.discard(item)

    pipeline.run(range(100), read=read, compute=lambda item, slot: item, write=write, slots=slots)
    assert peak[0] <= slots and len(seen) <= slots


def test_a_slot_hands_out_aligned_buffers_and_refuses_what_does_not_fit():
    slot = pipeline.Slot(1000, pinned=False)
    a, b = slot.take(10), slot.take(300)
    assert a.numel() == 10 and b.numel() == 300
    assert b.data_ptr() - a.data_ptr() == pipeline.ALIGN
    assert slot.take(1000) is None  # 256 + 300 taken: 1000 more do not fit
    slot.reset()
    assert slot.take(1000).data_ptr() == a.data_ptr()
    cpu = {"x": torch.randn(3)}
    assert slot.to_host(cpu)["x"] is cpu["x"]  # nothing to copy on the CPU
    assert pipeline.Slot(1000, pinned=False, out_bytes=10**9).nbytes == 1000  # no output buffer on the CPU


def test_a_lazy_endless_stream_stops_at_the_first_error():
    """Items may be a lazy, endless iterable: the reader takes only what the slots allow, and an error stops it."""
    taken = []

    def items():
        for i in itertools.count():
            taken.append(i)
            yield i

    def write(item):
        if item == 5:
            raise QtoolError("stop here")

    with pytest.raises(QtoolError, match="stop here"):
        pipeline.run(items(), read=lambda i, s: i, compute=lambda i, s: i, write=write, slots=2)
    assert len(taken) <= 5 + 2 + 1


def _interrupted() -> Interrupted:
    return Interrupted(signal.SIGTERM)


ERRORS = {
    "qtool-error": lambda: QtoolError("the layer is bad", hint="a hint"),
    "disk-full": lambda: OSError(28, "No space left on device"),
    "ctrl-c": KeyboardInterrupt,
    "sigterm": _interrupted,
    "bug": lambda: ValueError("a bug"),
}


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_an_error_in_any_stage_is_raised_unchanged_and_nothing_after_it_is_written(stage, error):
    """The caller gets the very exception object a stage raised; no item from the failing one on is written, and
    (the fixture) no stage thread is left."""
    rng = random.Random(hash((stage, error)) % 1000)
    exc = ERRORS[error]()
    fail_at = 13
    written = []

    def stage_fn(name):
        def fn(item, *_):
            jitter(rng)
            if name == stage and item == fail_at:
                raise exc
            return item

        return fn

    def write(item):
        stage_fn("write")(item)
        written.append(item)

    with pytest.raises(type(exc)) as info:
        pipeline.run(range(40), read=stage_fn("read"), compute=stage_fn("compute"), write=write, slots=3)
    assert info.value is exc
    assert written == list(range(len(written))) and len(written) <= fail_at


def test_an_error_elsewhere_wakes_the_calling_thread_waiting_for_the_reader():
    """The writer fails while the reader is slow: the run raises without waiting for the reader's next item."""

    def read(item, slot):
        if item == 1:
            time.sleep(3)
        return item

    def write(item):
        raise OSError(5, "Input/output error")

    started = time.monotonic()
    with pytest.raises(OSError, match="Input/output error"):
        pipeline.run(range(3), read=read, compute=lambda i, s: i, write=write)
    # The reader's sleep of item 1 is waited for (threads never outlive run), nothing more.
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_promptly(signum):
    """A signal while the calling thread waits (for a slow reader) is raised within a poll interval or so, as
    under the CLI (handle_signals turns SIGTERM into Interrupted); the stage threads end first."""

    def read(item, slot):
        time.sleep(0.2)
        return item

    timer = threading.Timer(0.5, os.kill, (os.getpid(), signum))
    expected = KeyboardInterrupt if signum == signal.SIGINT else Interrupted
    with handle_signals(), pytest.raises(expected):
        timer.start()
        started = time.monotonic()
        try:
            pipeline.run(itertools.count(), read=read, compute=lambda i, s: i, write=lambda i: None)
        finally:
            took = time.monotonic() - started
            timer.cancel()
    assert took < 1.5


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="slots must be >= 1"):
        pipeline.run([], read=None, compute=None, write=None, slots=0)


def test_an_empty_stream_measures_nothing():
    stats = pipeline.run([], read=None, compute=None, write=None)
    data = stats.to_dict()
    assert stats.items == 0 and data["items"] == 0 and data["stage_seconds"]["read"] == 0.0
    # Every time sits under a key that says seconds (what benchmarks/e2e_quantize.py records); the rest is counts.
    assert set(data["stage_seconds"]) == {"wall", "read", "compute", "wait", "write", "starved", "finish", "verify"}


@pytest.mark.gpu
def test_cuda_copies_overlap_without_corrupting_slots():
    """On a GPU: bf16 weights read into pinned slots, copied to the device on the side stream, quantized and
    measured there, copied back into the slots without a sync; the writer's bytes equal a serial CPU-side run of
    the same device code, and every pinned slot is the pool's."""
    from qtool import verify
    from qtool.quantize import quantize_pending

    torch.manual_seed(0)
    weights = [torch.randn(96 + 8 * i, 512, dtype=torch.bfloat16) for i in range(24)]
    got = []

    def read(i, slot):
        buf = slot.take(weights[i].numel() * 2)
        host = buf.view(torch.bfloat16).view(weights[i].shape)
        host.copy_(weights[i])
        return i, host

    def compute(payload, slot):
        i, host = payload
        assert host.is_pinned()
        w = host.to("cuda", non_blocking=True)
        layer = quantize_pending(w, double_quant=True)
        return i, slot.to_host({**layer.tensors, "stats": verify.layer_stats(w, layer)})

    def write(result):
        i, tensors = result
        got.append((i, {k: v.clone() for k, v in tensors.items()}))

    stats = pipeline.run(range(len(weights)), read=read, compute=compute, write=write, device="cuda",
                         slot_bytes=weights[-1].numel() * 2, slots=2)  # fmt: skip
    assert [i for i, _ in got] == list(range(len(weights))) and stats.wait >= 0
    for i, tensors in got:
        w = weights[i].cuda()
        layer = quantize_pending(w, double_quant=True)
        expected = {**layer.tensors, "stats": verify.layer_stats(w, layer)}
        for key, value in expected.items():
            assert_equal(tensors[key], value.cpu(), f"item {i} {key}")

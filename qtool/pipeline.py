"""A three-stage streaming engine: read, compute, write, each on its own thread, items kept in order.

``run`` moves a sequence of items through a reader thread, the calling thread and a writer thread, so that disk
reads, device work and disk writes overlap. It is generic: the stages are the caller's functions (``qtool.api``
quantizes with it, ``qtool.dequant`` dequantizes). What it guarantees:

- Order: items are computed and written in the order given.
- Bounded memory: every item in flight holds one ``Slot`` (host buffers, pinned for a CUDA device) from a fixed pool,
  so at most ``slots`` items exist at once, whatever the stages' speeds.
- No host sync per item on CUDA: compute runs on a side stream; its host-to-device copies start from pinned memory
  (``non_blocking``), its device-to-host copies land in pinned memory (``Slot.to_host``), and one event is recorded
  per item. The writer thread waits on that event, writes, and only then returns the slot to the pool: a pinned
  buffer is never reused while a copy from or into it may still run.
- Errors: an exception in any stage stops all three promptly and is raised to the caller, the same object
  (QtoolError, OSError, KeyboardInterrupt, ``qtool.interrupts.Interrupted``). Compute runs on the calling thread,
  which is the one Python delivers signals to. The worker threads have ended when ``run`` returns or raises.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Items in flight: one being read, one computed, one written. A fourth would only help if the stages' times varied
# from item to item more than the slots can absorb.
DEFAULT_SLOTS = 3
# How often a blocked stage looks whether another one failed (seconds). Waits end at once when what they wait for
# arrives; this only bounds how late a stage notices a failure elsewhere.
POLL_SECONDS = 0.05
# Byte alignment of the tensors carved out of a slot's buffers (typed views need at least the item size; 256 suits
# DMA and the Triton kernels' vector loads).
ALIGN = 256


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


class Slot:
    """Host memory for one item in flight: ``take`` carves input buffers out of it (the reader's), ``to_host``
    copies device tensors into it (compute's). Both restart from the beginning for each item.

    With a CUDA device the memory is pinned and ``to_host`` copies are asynchronous; the engine makes sure no item
    uses a slot before the previous item's copies have finished. On the CPU ``to_host`` returns its tensors as they
    are. The input buffer is allocated once (``nbytes``); the output buffer grows to the largest item's output.
    """

    def __init__(self, nbytes: int, pinned: bool, out_bytes: int = 0):
        self.pinned = pinned
        self.input = _host_buffer(nbytes, pinned)
        # Sized up front where the caller knows the largest output: a buffer that grows leaves its smaller pinned
        # predecessors in torch's pinned-memory cache, resident.
        self._output: torch.Tensor | None = _host_buffer(out_bytes, pinned) if out_bytes and pinned else None
        self._taken = 0

    @property
    def nbytes(self) -> int:
        """Bytes of pinned (or plain) host memory this slot holds now."""
        return self.input.numel() + (0 if self._output is None else self._output.numel())

    def reset(self) -> None:
        self._taken = 0

    def take(self, nbytes: int) -> torch.Tensor | None:
        """The next ``nbytes`` of the input buffer (uint8, 1-D, ``ALIGN``-aligned), or None if they do not fit."""
        start = self._taken
        if start + nbytes > self.input.numel():
            return None
        self._taken = _align(start + nbytes)
        return self.input[start : start + nbytes]

    def to_host(self, tensors: dict[str, torch.Tensor], non_blocking: bool = True) -> dict[str, torch.Tensor]:
        """Copy device tensors into this slot's output buffer: same keys, dtypes and shapes, contiguous, on the
        host. CPU tensors are returned as they are (nothing to copy). The copies are queued on the current stream;
        they are complete once the item's event has fired (the engine waits for it before writing)."""
        if all(t.device.type == "cpu" for t in tensors.values()):
            return dict(tensors)
        sizes = [_align(t.numel() * t.element_size()) for t in tensors.values()]
        need = sum(sizes)
        if self._output is None or self._output.numel() < need:
            # Only the first items grow it; the old buffer has no copy in flight (the slot was free).
            self._output = _host_buffer(need, self.pinned)
        out, offset = {}, 0
        for (key, t), size in zip(tensors.items(), sizes, strict=True):
            nbytes = t.numel() * t.element_size()
            # [nbytes] uint8 -> t's dtype and shape; element_size divides ALIGN, so the view is aligned.
            host = self._output[offset : offset + nbytes].view(t.dtype).view(t.shape)
            host.copy_(t, non_blocking=non_blocking)
            out[key] = host
            offset += size
        return out


@dataclass
class PipelineStats:
    """What one ``run`` measured, in seconds and bytes.

    ``read``, ``compute`` and ``write`` are the busy time of each stage; ``wait`` is the writer's wait for an
    item's device work and device-to-host copies (CUDA; zero on the CPU); ``starved`` is the calling thread's wait
    for the reader. With overlap, ``wall`` is close to the largest stage time rather than their sum. The caller
    fills in the bytes, the GPU peak (``torch.cuda.max_memory_allocated``) and what it does after the stream:
    ``finish`` (the writer's close: shards completed and renamed, the index) and ``verify`` (the read-back).
    """

    wall: float = 0.0
    read: float = 0.0
    compute: float = 0.0
    wait: float = 0.0
    write: float = 0.0
    starved: float = 0.0
    items: int = 0
    slots: int = 0
    slot_bytes: int = 0  # host memory of all slots together (pinned on CUDA) at the end
    finish: float = 0.0
    verify: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_gpu_bytes: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready: the times under ``stage_seconds`` (rounded to milliseconds), then the counts and bytes."""
        values = asdict(self)
        seconds = {k: round(v, 3) for k, v in values.items() if isinstance(v, float)}
        return {"stage_seconds": seconds} | {k: v for k, v in values.items() if k not in seconds}


class _Failed:
    """A stage's exception, sent to the calling thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    """The next entry of ``q``, or None once ``stop`` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
    return None


def _join(threads: list[threading.Thread]) -> BaseException | None:
    """Wait for every thread to end, even if a signal interrupts the wait; return the first such interruption."""
    interrupted = None
    for thread in threads:
        while thread.is_alive():
            try:
                thread.join(POLL_SECONDS)
            except BaseException as exc:  # Ctrl-C while joining: finish the join first
                interrupted = interrupted or exc
    return interrupted


def run(
    items: Iterable[Any],
    *,
    read: Callable[[Any, Slot], Any],
    compute: Callable[[Any, Slot], Any],
    write: Callable[[Any], None],
    device: str = "cpu",
    slot_bytes: int = 0,
    slots: int = DEFAULT_SLOTS,
    out_bytes: int = 0,
) -> PipelineStats:
    """Stream ``items`` through ``read`` (reader thread), ``compute`` (this thread) and ``write`` (writer thread).

    Args:
        items: what to process, in order (e.g. the keys of one layer).
        read: ``read(item, slot) -> payload``: reads the item's data, into ``slot.take(n)`` buffers where they fit.
        compute: ``compute(payload, slot) -> result``: device work; on CUDA it runs on a side stream and must leave
            its results on the host through ``slot.to_host`` (asynchronous; never wait for the device here).
        write: ``write(result)``: runs once the item's device work and copies are complete; may raise to refuse
            the item (nothing of it or of later items is written then).
        device: "cuda" (pinned slots, a side stream, one event per item) or "cpu".
        slot_bytes: each slot's input buffer, in bytes (the largest item's input, aligned per tensor).
        slots: items in flight at most (>= 1).
        out_bytes: each slot's output buffer for ``Slot.to_host`` on CUDA, if known (the largest item's output,
            aligned per tensor); it grows as needed otherwise.

    Returns:
        The stages' measured times (``PipelineStats``; bytes and GPU peak left for the caller).

    Raises:
        Whatever a stage raised first, unchanged. The threads have ended by then, and the side stream is idle.
    """
    import torch

    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    cuda = torch.device(device).type == "cuda"
    started = time.perf_counter()
    stats = PipelineStats(slots=slots)
    stop = threading.Event()
    errors: list[BaseException] = []
    pool: queue.Queue[Slot] = queue.Queue()
    all_slots = [Slot(slot_bytes, pinned=cuda, out_bytes=out_bytes) for _ in range(slots)]
    for slot in all_slots:
        pool.put(slot)
    ready: queue.Queue = queue.Queue()  # reader -> compute: (payload, slot), _END or _Failed; <= slots entries
    done: queue.Queue = queue.Queue()  # compute -> writer: (result, slot, event) or _END; <= slots entries
    stream = torch.cuda.Stream(device=device) if cuda else None

    def fail(exc: BaseException) -> None:
        if not stop.is_set():
            errors.append(exc)
            stop.set()
        ready.put(_Failed(exc))  # wakes the calling thread if it waits for the reader

    def reader() -> None:
        try:
            for item in items:
                slot = _get(pool, stop)
                if slot is None:
                    return
                slot.reset()
                t = time.perf_counter()
                payload = read(item, slot)
                stats.read += time.perf_counter() - t
                ready.put((payload, slot))
                del payload
            ready.put(_END)
        except BaseException as exc:
            fail(exc)

    def writer() -> None:
        try:
            while True:
                entry = _get(done, stop)
                if entry is None or entry is _END:
                    return
                result, slot, event = entry
                del entry
                if event is not None:
                    t = time.perf_counter()
                    event.synchronize()  # releases the GIL; a blocking event sleeps instead of spinning
                    stats.wait += time.perf_counter() - t
                if stop.is_set():
                    return
                t = time.perf_counter()
                write(result)
                stats.write += time.perf_counter() - t
                del result
                pool.put(slot)
        except BaseException as exc:
            fail(exc)

    threads = [
        threading.Thread(target=reader, name="qtool-reader", daemon=True),
        threading.Thread(target=writer, name="qtool-writer", daemon=True),
    ]

    def shutdown() -> BaseException | None:
        stop.set()
        interrupted = _join([t for t in threads if t.ident is not None])
        if stream is not None:
            # No copy may still read or fill a slot once the caller drops them (errors leave some in flight).
            with contextlib.suppress(Exception):
                stream.synchronize()
        return interrupted

    try:
        for thread in threads:
            thread.start()
        while True:
            t = time.perf_counter()
            entry = _wait_ready(ready)
            stats.starved += time.perf_counter() - t
            if entry is _END:
                break
            if isinstance(entry, _Failed) or errors:
                raise errors[0] if errors else entry.exc
            payload, slot = entry
            del entry
            t = time.perf_counter()
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                result = compute(payload, slot)
                event = None
                if cuda:
                    event = torch.cuda.Event(blocking=True)
                    event.record(stream)
            stats.compute += time.perf_counter() - t
            del payload
            done.put((result, slot, event))
            del result
            stats.items += 1
        done.put(_END)
        # The writer ends after the last item, or at its first error; either way it is the last to finish.
        while threads[1].is_alive():
            threads[1].join(POLL_SECONDS)
        if errors:
            raise errors[0]
    except BaseException:
        shutdown()
        raise
    interrupted = shutdown()
    if interrupted is not None:
        raise interrupted
    stats.slot_bytes = sum(s.nbytes for s in all_slots)
    stats.wall = time.perf_counter() - started
    return stats


def _wait_ready(ready: queue.Queue) -> Any:
    """The next entry from the reader. Waits in short steps so that a signal (Ctrl-C) is handled promptly."""
    while True:
        try:
            return ready.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue

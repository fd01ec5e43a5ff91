"""Background dump writing from a reusable host buffer (torch needed).

Forward hooks copy each tensor into a slot of :class:`HostRing`, a pre-faulted (pinned on
CUDA/NPU) host buffer, and hand the slot to :class:`BackgroundWriter`, whose thread writes it
to the :class:`~precision.dumps.dump.DumpWriter` and frees the slot. On an accelerator
(CUDA, NPU: :func:`precision.runtime.devices.streams`) the tensor is first cloned on the
compute stream (a device copy, ordered before any later in-place operation of the model
on it: ``out += identity``, an in-place activation, a cache update), and the clone is copied
to the host on a side stream that waits for the compute stream's work so far, so the
device-to-host copies overlap the next kernels; an event after each copy tells the writer
thread when its slot is filled, and the clone's memory is not reused before then (that
thread sets the copy's device first: a thread's device context is its own, and an NPU's
runtime calls from a thread that never set one fail or go to device 0). No host
wait happens in the forward unless the ring is full. Reusing memory that is already mapped
avoids the page faults that make naive clone-everything capture slow; writing in a thread
overlaps disk I/O with the model's compute. Memory stays bounded: a hook waits when the
ring is full, and a tensor larger than the ring (a host buffer of its own) waits until the
one before it is written.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ...dumps.dump import DumpWriter
from ..devices import streams

_ALIGN = 64


_POOL: dict[tuple[int, bool], list[HostRing]] = {}
_POOL_LOCK = threading.Lock()


class HostRing:
    """A circular host buffer, allocated FIFO: ``alloc`` waits for room, ``free`` the oldest.

    :meth:`acquire`/:meth:`release` keep finished rings for the next capture in the process,
    so repeated captures (a notebook, a benchmark) do not fault fresh pages in each time.
    """

    @classmethod
    def acquire(cls, capacity: int, *, pin: bool) -> HostRing:
        with _POOL_LOCK:
            free = _POOL.get((capacity, pin))
            if free:
                return free.pop()
        return cls(capacity, pin=pin)

    def release(self) -> None:
        """Return an idle ring to the pool (at most one kept per size)."""
        with _POOL_LOCK:
            slot = _POOL.setdefault((self.capacity, self.pinned), [])
            if not slot and not self._live:
                slot.append(self)

    def __init__(self, capacity: int, *, pin: bool) -> None:
        self.capacity = capacity
        self.pinned = pin
        try:
            self.buf = torch.empty(capacity, dtype=torch.uint8, pin_memory=pin)
        except RuntimeError:  # pinning unsupported by this build: plain memory still works
            self.buf = torch.empty(capacity, dtype=torch.uint8)
        self.buf.zero_()  # fault the pages in now, not during the forward
        self._live: deque[tuple[int, int]] = deque()
        self._head = 0
        self._cv = threading.Condition()

    def alloc(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (<= capacity) and return the offset; blocks while the ring is full."""
        n = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        with self._cv:
            while True:
                start = self._fit(n)
                if start is not None:
                    self._live.append((start, start + n))
                    self._head = start + n
                    return start
                self._cv.wait()

    def _fit(self, n: int) -> int | None:
        if not self._live:
            return 0 if n <= self.capacity else None
        tail = self._live[0][0]
        if self._head > tail:  # live region [tail, head): room at the end, else wrap to 0
            if n <= self.capacity - self._head:
                return self._head
            return 0 if n <= tail else None
        return self._head if n <= tail - self._head else None  # wrapped: room in [head, tail)

    def free(self) -> None:
        """Release the oldest allocation."""
        with self._cv:
            self._live.popleft()
            self._cv.notify_all()


@dataclass
class _Item:
    key: str
    dtype: str
    shape: tuple[int, ...]
    host: torch.Tensor
    in_ring: bool
    event: Any
    #: the device whose side stream made the copy (None for a plain copy)
    device: torch.device | None = None


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """An empty host tensor, pinned where asked and this build can (else plain memory,
    which still works: copies to it are then synchronous)."""
    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(shape, dtype=dtype)


class BackgroundWriter:
    """Copies tensors to host memory in the caller's thread and writes them in its own thread.

    :meth:`submit` may be called from several threads (the autograd threads of a model on
    several devices call the gradient hooks): a lock keeps each one's slot and its place in
    the queue together, which the ring's first-in, first-out ``free`` relies on."""

    def __init__(self, writer: DumpWriter, *, device_type: str, buffer_bytes: int) -> None:
        self.writer = writer
        self.device_type = device_type
        self.ring = HostRing.acquire(buffer_bytes, pin=device_type != "cpu")
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=256)
        #: device -> the side stream its copies run on
        self._side: dict[torch.device, Any] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        #: held from a tensor larger than the ring's copy until it is written: at most one
        #: such host buffer at a time
        self._oversized = threading.Semaphore(1)
        self._thread = threading.Thread(target=self._run, name="precision-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, dtype: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (any device, any strides) for writing under ``key``."""
        self._raise_if_failed()
        t = tensor.detach()
        nbytes = t.numel() * t.element_size()
        in_ring = nbytes <= self.ring.capacity
        if not in_ring:  # outside the lock: the writer may need it to free ring slots
            self._oversized.acquire()
        with self._lock:
            if in_ring:
                off = self.ring.alloc(nbytes)
                host = self.ring.buf[off:off + nbytes].view(t.dtype).view(t.shape)
            else:
                host = host_empty(tuple(t.shape), t.dtype, pin=self.device_type != "cpu")
            api = streams(t.device.type)
            event = None
            if api is None:  # the CPU (and devices without streams): a plain copy
                host.copy_(t)
            else:  # on a side stream of the tensor's own device (models spread over several)
                side = self._side.get(t.device)
                if side is None:
                    side = self._side[t.device] = api.Stream(t.device)
                # the values as they are now: a later in-place operation of the model, on the
                # compute stream, may run before the side stream's copy would read them
                snapshot = t.clone()
                side.wait_stream(api.current_stream(t.device))
                with api.stream(side):
                    host.copy_(snapshot, non_blocking=True)
                snapshot.record_stream(side)  # not reused before the copy is done
                event = api.Event()
                event.record(side)
            self._queue.put(_Item(key, dtype, tuple(t.shape), host, in_ring, event,
                                  None if api is None else t.device))

    def _run(self) -> None:
        bound: torch.device | None = None  # the device this thread is set to
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if item.event is not None:  # even after an error: the slot is in use until then
                    try:
                        if item.device is not None and item.device != bound:
                            self._bind(item.device)
                            bound = item.device
                    finally:  # a failed bind still waits for the copy before the slot is freed
                        item.event.synchronize()
                if self._error is None:
                    data = item.host.reshape(-1).view(torch.uint8).numpy()
                    self.writer.write(item.key, item.dtype, item.shape, data)
            except BaseException as exc:  # the first is surfaced to the capturing thread
                self._error = self._error or exc
            finally:
                if item.in_ring:
                    self.ring.free()
                else:
                    self._oversized.release()

    @staticmethod
    def _bind(device: torch.device) -> None:
        """Set this thread's current device to ``device`` (a thread starts with none of its
        own: an NPU's runtime calls from it fail, or go to device 0)."""
        api = streams(device.type)
        if api is not None:
            api.set_device(device)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait until everything queued is written; re-raise a writer-thread error."""
        self._queue.put(None)
        self._thread.join()
        self.ring.release()
        self._raise_if_failed()

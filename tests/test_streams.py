"""The accelerator path of full-mode copies (precision.runtime.capture.streaming), on the CPU.

A device runs work asynchronously: a copy queued on a side stream reads its source when
the device gets to it, after whatever the compute stream ran in the meantime. :class:`Async`
stands for such a device's stream API (``torch.cuda``, ``torch.npu``): inside its side
stream a copy is queued, not made, and it is made when the event recorded after it is
synchronised, which a test holds back until it chooses.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import precision  # noqa: E402
from precision.runtime.capture import streaming  # noqa: E402
from precision.runtime.capture.streaming import BackgroundWriter  # noqa: E402


class Queued(TorchDispatchMode):
    """Inside a side stream: a copy is queued on the stream instead of made."""

    def __init__(self, stream: Stream) -> None:
        super().__init__()
        self.stream = stream

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func is torch.ops.aten.copy_.default:
            self.stream.queued.append((args[0], args[1]))
            return args[0]
        return func(*args, **(kwargs or {}))


class Stream:
    def __init__(self, device: Any = None) -> None:
        self.queued: list[tuple[torch.Tensor, torch.Tensor]] = []

    def wait_stream(self, other: Stream) -> None:
        """The compute stream's work is done by then (the CPU ran it)."""


class Event:
    """Recorded after a side stream's copies; ``synchronize`` makes them, once the test
    sets :attr:`Async.release`."""

    def __init__(self) -> None:
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.synchronized = False

    def record(self, stream: Stream) -> None:
        self.copies, stream.queued[:] = list(stream.queued), []
        Async.events.append(self)

    def synchronize(self) -> None:
        # as an NPU's runtime: a thread that never set its device has no context to call in
        assert threading.get_ident() in Async.bound or not Async.strict, \
            "synchronize on a thread with no device"
        assert Async.release.wait(10)
        for dst, src in self.copies:
            dst.copy_(src)
        self.synchronized = True

    def query(self) -> bool:
        return self.synchronized


class Async:
    """A device's stream-and-event namespace, as :func:`precision.runtime.devices.streams`
    gives it."""

    Stream = Stream
    Event = Event
    release: ClassVar[threading.Event] = threading.Event()
    events: ClassVar[list[Event]] = []
    #: thread id -> the device it set last (the test's own thread stands for the forward's,
    #: which the model's loading set)
    bound: ClassVar[dict[int, Any]] = {}
    #: whether a synchronize from a thread that set no device fails
    strict: ClassVar[bool] = True

    @staticmethod
    def set_device(device: Any) -> None:
        Async.bound[threading.get_ident()] = device

    @staticmethod
    def current_stream(device: Any = None) -> Stream:
        return Stream()

    @staticmethod
    @contextlib.contextmanager
    def stream(side: Stream) -> Iterator[None]:
        with Queued(side):
            yield


@pytest.fixture
def async_device(monkeypatch: pytest.MonkeyPatch) -> type[Async]:
    """Full-mode copies of CPU tensors go through :class:`Async`, as a device's would."""
    Async.release = threading.Event()
    Async.events = []
    Async.bound = {threading.get_ident(): torch.device("cpu")}
    Async.strict = True
    monkeypatch.setattr(streaming, "streams", lambda kind: Async)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    return Async


class AddsInPlace(torch.nn.Module):
    """A block whose own forward changes its submodule's output in place afterwards, as a
    residual ``out += identity`` or an in-place activation does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h += 100.0
        return h


def test_a_copy_on_the_side_stream_holds_the_values_the_hook_saw(
        async_device: type[Async], tmp_path: Path) -> None:
    """The side stream's copy runs after the model changed the output in place; the dump
    still holds the output as its module returned it (the hook's snapshot, made on the
    compute stream), and the block's own output as changed."""
    torch.manual_seed(0)
    model = AddsInPlace()
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model.lin(x)
        with precision.capture(model, tmp_path / "a.st") as cap:
            model(x)
            assert async_device.events and not any(e.synchronized for e in async_device.events)
            async_device.release.set()  # the device reaches the copies only now
    np.testing.assert_array_equal(cap.dump["lin:out"], expected.numpy())
    np.testing.assert_array_equal(cap.dump["root:out"], expected.numpy() + 100.0)
    # the writer's thread set the copies' device before it waited on their events
    assert list(async_device.bound.values()) == [torch.device("cpu")] * 2


class GatedWriter:
    """A dump writer whose writes wait for :attr:`gate` (a slow disk)."""

    def __init__(self, fail: bool = False) -> None:
        self.gate = threading.Event()
        self.written: list[str] = []
        self.fail = fail

    def write(self, key: str, dtype: str, shape: tuple[int, ...], data: Any) -> None:
        assert self.gate.wait(10)
        if self.fail:
            raise OSError(28, "No space left on device")
        self.written.append(key)


def test_one_tensor_larger_than_the_ring_at_a_time() -> None:
    """A tensor larger than the ring gets a host buffer of its own; the next one waits until
    it is written, so host memory stays bounded by the ring and one such tensor."""
    disk = GatedWriter()
    writer = BackgroundWriter(disk, device_type="cpu", buffer_bytes=0)  # type: ignore[arg-type]
    submitted: list[int] = []

    def submit_three() -> None:
        for i in range(3):
            writer.submit(f"k{i}:out", "float32", torch.ones(16))
            submitted.append(i)

    thread = threading.Thread(target=submit_three)
    thread.start()
    time.sleep(0.3)
    assert submitted == [0]  # the second waits for the first to be written
    disk.gate.set()
    thread.join(10)
    writer.finish()
    assert submitted == [0, 1, 2] and disk.written == ["k0:out", "k1:out", "k2:out"]


class Frees(list[bool]):
    """For each ring slot freed, whether every copy up to it had landed by then."""

    writer: BackgroundWriter


def _submit_watching_frees(device: type[Async], disk: GatedWriter, n: int) -> Frees:
    """``n`` tensors submitted to a new writer whose ring records each free (:class:`Frees`);
    the device and the disk are then let go."""
    writer = BackgroundWriter(disk, device_type="cpu", buffer_bytes=1 << 20)  # type: ignore[arg-type]
    freed = Frees()
    freed.writer = writer
    free = writer.ring.free

    def checked_free() -> None:
        freed.append(all(e.synchronized for e in device.events[:len(freed) + 1]))
        free()

    writer.ring.free = checked_free  # type: ignore[method-assign]
    for i in range(n):
        writer.submit(f"k{i}:out", "float32", torch.full((8,), float(i)))
    device.release.set()
    disk.gate.set()
    return freed


def test_after_a_write_fails_each_copy_is_waited_for_before_its_slot_is_freed(
        async_device: type[Async]) -> None:
    """Once a write fails the rest are not written, but each copy still lands before its ring
    slot goes back (to the next capture of the process, whose copies would otherwise be
    overwritten by these), and the first error is the one raised."""
    disk = GatedWriter(fail=True)
    freed = _submit_watching_frees(async_device, disk, 3)
    with pytest.raises(OSError, match="No space left"):
        freed.writer.finish()
    assert freed == [True, True, True]
    assert all(e.synchronized for e in async_device.events)


def test_a_device_that_cannot_be_set_still_waits_for_its_copies(
        async_device: type[Async], monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread's set_device fails: the error is raised, and each copy still lands
    before its ring slot is freed (a slot freed first would be overwritten by the next)."""
    def refuse(device: Any) -> None:
        raise RuntimeError("no such device")

    monkeypatch.setattr(Async, "set_device", staticmethod(refuse))
    async_device.strict = False
    disk = GatedWriter()
    freed = _submit_watching_frees(async_device, disk, 2)
    with pytest.raises(RuntimeError, match="no such device"):
        freed.writer.finish()
    assert freed == [True, True] and disk.written == []

"""Stats reduced on the device in batches (precision/runtime/capture/deferred.py): the same
numbers as the direct path, and no host round trip per record during a captured forward."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import precision  # noqa: E402
from precision.dumps.sketch import count_sketch, decode  # noqa: E402
from precision.runtime.capture.deferred import DeferredStats  # noqa: E402
from precision.runtime.capture.tensorstats import tensor_stats  # noqa: E402


def records() -> list[Any]:
    """Records that take every branch of the direct path: plain, half precision, a mean far
    above the spread (the two-pass variance), NaN/inf/masked, beyond fp16, integers,
    strided, empty, a scalar, fp16's own lowest value, values fp16 flushes to zero."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 128, 512, generator=g),
            torch.randn(3, 7, generator=g).to(torch.bfloat16),
            (torch.randn(5000, generator=g) * 1000).to(torch.float16),
            torch.randn(2, 3000, generator=g).double() + 100,
            torch.full((3000,), 1e4) + torch.randn(3000, generator=g) * 1e-3,
            torch.tensor([1.0, math.nan, math.inf, -math.inf, -3.4e38, 5.0]),
            torch.tensor([70000.0, 1.0, -2.0]),
            torch.tensor([math.nan, math.inf]),
            torch.arange(10),
            torch.randn(6, 900, generator=g)[:, ::3],
            torch.empty(0),
            torch.tensor(3.0),
            torch.tensor([-65504.0, 1.0]).half(),
            torch.tensor([1e-8, 0.0, 1.0, -3e-8])]


def assert_same(direct: dict[str, Any], deferred: dict[str, Any]) -> None:
    """Counts and extrema equal, sums within float32 rounding (the direct path accumulates
    in float32 cascades, relative error about 1e-7 at these sizes; the deferred in float64):
    the norm and std within 2e-6 of themselves, the mean within 1e-6 of the root mean
    square (a sum that cancels keeps the absolute error of its terms' scale), the sketch
    within 1e-6 of the norm (the CPU's float32 matrix-vector product)."""
    assert list(direct) == list(deferred)
    for key, a in direct.items():
        b = deferred[key]
        if key == "sketch":
            np.testing.assert_allclose(decode(b), decode(a), rtol=0,
                                       atol=1e-6 * direct["norm"])
        elif key == "mean" and a is not None:
            rms = direct["norm"] / math.sqrt(direct["numel"])
            assert b == pytest.approx(a, rel=0, abs=1e-6 * rms + 1e-300), key
        elif key in ("std", "norm") and a is not None:
            assert b == pytest.approx(a, rel=2e-6, abs=1e-12), key
        else:
            assert a == b, key


@pytest.mark.parametrize("capacity", [1 << 24, 4096])
def test_deferred_statistics_equal_the_direct_path(capacity: int) -> None:
    """Every record in one batch (the default arena), and in an arena of 4 rows, where
    records fill it (flushed in several batches) or are larger (taken in pieces, and the
    arena never grows past its capacity)."""
    d = DeferredStats(detail=True, capacity=capacity)
    xs = records()
    tickets = [d.add(x) for x in xs]
    assert all(lane.buf.numel() <= capacity for lane in d._lanes.values())
    done = d.results()
    for x, ticket in zip(xs, tickets, strict=True):
        assert_same(tensor_stats(x, detail=True), done[ticket])


def test_a_record_larger_than_the_arena_is_reduced_in_pieces() -> None:
    """A record of 4.3M elements through an arena of 1M: five pieces, the last ones past the
    first period of the sketch's signs; the combined statistics are the float64 figures
    (the deviations about each piece's mean moved to the record's, exactly enough for a
    mean 1e4 times the spread) and the arena stays at 1M."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4_300_000, generator=g) + 3.0
    y = torch.full((4_300_000,), 1e4) + torch.randn(4_300_000, generator=g)
    d = DeferredStats(capacity=1 << 20)
    tickets = [d.add(x), d.add(y)]
    assert max(lane.buf.numel() for lane in d._lanes.values()) <= 1 << 20
    assert len(d._pieces[tickets[0]]) == 5
    done = d.results()
    for t, ticket in zip((x, y), tickets, strict=True):
        st, ref = done[ticket], t.double().numpy()
        assert (st["min"], st["max"]) == (float(t.min()), float(t.max()))
        assert st["mean"] == pytest.approx(float(ref.mean()), rel=1e-12)
        assert st["std"] == pytest.approx(float(ref.std()), rel=1e-9)
        assert st["norm"] == pytest.approx(float(np.linalg.norm(ref)), rel=1e-12)
        np.testing.assert_allclose(decode(st["sketch"]), count_sketch([ref]), rtol=2.0**-23,
                                   atol=1e-9 * np.linalg.norm(ref))


def test_a_device_without_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the device has no float64 (NPU: ``_wide`` is float32), integer records go
    through a float32 arena, the sums are float32 and the counts stay exact integers past
    2^24 (17M masked values, which float32 would round)."""
    from precision.runtime.capture import deferred

    monkeypatch.setattr(deferred, "_wide", lambda device: torch.float32)
    big = torch.zeros(17_000_003)
    big[3:] = -math.inf  # masked (an additive mask's -inf)
    xs = [torch.arange(1000), torch.tensor([[0, 1, 1], [1, 1, 0]]), big,
          *records()]
    d = DeferredStats(detail=True)
    tickets = [d.add(x) for x in xs]
    assert d._lanes[("cpu", torch.int64)].buf.dtype == torch.float32
    done = d.results()
    assert done[tickets[2]]["masked"] == done[tickets[2]]["neginf"] == 17_000_000
    for x, ticket in zip(xs, tickets, strict=True):
        direct, got = tensor_stats(x, detail=True), done[ticket]
        assert list(direct) == list(got)
        for key, a in direct.items():
            if key == "sketch":
                np.testing.assert_allclose(decode(got[key]), decode(a), rtol=0,
                                           atol=1e-5 * direct["norm"])
            elif isinstance(a, float) and (direct["absmax"] or 0) > 1e19 and key != "absmax":
                assert got[key] is None or got[key] == pytest.approx(a, rel=1e-5), key  # x²
                # overflows float32, on the direct path's NPU sums too: no std, no norm
            elif isinstance(a, float):
                assert got[key] == pytest.approx(a, rel=1e-5, abs=1e-5 * (direct["norm"] or 1))
            else:
                assert got[key] == a, key


def test_a_row_whose_sum_overflows_float32() -> None:
    """Values near float32's limit (1e37, finite and not masked): the rows' sums in float64
    do not overflow, and the mean and std are the direct path's, not None."""
    x = torch.tensor([1e37, 3e37, -2e37, 2.5e37] * 300)
    d = DeferredStats()
    ticket = d.add(x)
    st = d.results()[ticket]
    assert st["mean"] is not None and st["std"] is not None
    assert_same(tensor_stats(x), st)


def test_deferred_statistics_of_a_large_record_are_float64_accurate() -> None:
    """Past one period of the sketch's signs, strided: the sketch is numpy's float64 one and
    the norm the float64 norm (the direct path's float32 norm of such a record is off by
    about 1e-3, which is why it is not the reference here); stored as float32."""
    x = torch.randn(2, 4_300_000, generator=torch.Generator().manual_seed(1))[:, ::2]
    d = DeferredStats()
    ticket = d.add(x)
    st = d.results()[ticket]
    ref = x.double().contiguous().numpy().ravel()
    assert st["norm"] == pytest.approx(float(np.linalg.norm(ref)), rel=1e-12)
    assert st["mean"] == pytest.approx(float(ref.mean()), abs=1e-9)  # the rms is 1
    # stored as float32: the float64 sums rounded once (2^-24 relative)
    np.testing.assert_allclose(decode(st["sketch"]), count_sketch([ref]), rtol=2.0**-23,
                               atol=1e-9 * np.linalg.norm(ref))


def tiny_llama(layers: int) -> Any:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def feed() -> dict[str, Any]:
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row: stats cover real tokens only
    return {"input_ids": ids, "attention_mask": mask}


#: the calls that bring a tensor's values to the host (on an accelerator, each waits for the
#: device to finish everything queued before it)
HOST_BOUND = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextmanager
def host_bound_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Count the host-bound calls precision's own code makes (the model's are not ours),
    and device synchronisations (torch.cuda's and the device registry's)."""
    from precision.runtime import devices

    counts: Counter[str] = Counter()

    def counted(name: str, original: Any) -> Any:
        def call(*a: Any, **kw: Any) -> Any:
            if sys._getframe(1).f_globals.get("__name__", "").startswith("precision."):
                counts[name] += 1
            return original(*a, **kw)
        return call

    for name in HOST_BOUND:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("synchronize",
                                                           torch.cuda.synchronize))
    monkeypatch.setattr(devices.Device, "synchronize",
                        counted("synchronize", devices.Device.synchronize))
    yield counts


def captured_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, layers: int,
                    **kw: Any) -> tuple[int, int, int]:
    """(host-bound calls during the captured forward, calls when the capture ends, records)."""
    model = tiny_llama(layers)
    with monkeypatch.context() as m, host_bound_calls(m) as counts:
        with torch.no_grad(), precision.capture(model, tmp_path / f"s{layers}.st",
                                                mode="stats", force=True, **kw) as cap:
            model(**feed())
            during = sum(counts.values())
        after = sum(counts.values()) - during
    return during, after, len(cap.entries)


def test_deferred_stats_make_no_host_round_trip_per_record(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """2 and 8 layers: 4x the records, the same host-bound calls during the forward (one per
    mask and per padded shape, none per record) and after it (one read per batch)."""
    small = captured_counts(monkeypatch, tmp_path, 2, deferred=True)
    large = captured_counts(monkeypatch, tmp_path, 8, deferred=True)
    assert large[2] > 3 * small[2]
    assert large[:2] == small[:2]
    assert large[0] <= 4  # the mask's "all real", the padded shapes' nonzero


def test_the_count_trips_on_the_direct_path(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """The CPU's direct path reads each record as it is made: its count grows with depth
    (with torch's reductions, several reads a record; the one-pass kernel makes one, its
    ``numpy()``, per record with statistics)."""
    from precision.kernel_choice import KERNEL_ENV

    monkeypatch.setenv(KERNEL_ENV, "numpy")
    small = captured_counts(monkeypatch, tmp_path, 2, deferred=False)
    large = captured_counts(monkeypatch, tmp_path, 8, deferred=False)
    assert large[0] > small[0] + (large[2] - small[2])  # more than one per extra record
    monkeypatch.setenv(KERNEL_ENV, "auto")
    fused_small = captured_counts(monkeypatch, tmp_path, 2, deferred=False)
    fused_large = captured_counts(monkeypatch, tmp_path, 8, deferred=False)
    assert fused_large[0] - fused_small[0] > (large[2] - small[2]) // 2


def test_deferred_capture_writes_the_direct_captures_statistics(tmp_path: Path) -> None:
    """The same model and left-padded batch captured both ways: every record's statistics
    agree (counts, extrema, ``padded`` exactly; sums within float rounding)."""
    model = tiny_llama(2)
    dumps = {}
    for deferred in (False, True):
        path = tmp_path / f"{deferred}.st"
        with torch.no_grad(), precision.capture(model, path, mode="stats",
                                                deferred=deferred):
            model(**feed())
        dumps[deferred] = precision.load(path)
    direct, batched = dumps[False], dumps[True]
    assert [e.key for e in direct.entries] == [e.key for e in batched.entries]
    padded = 0
    for a, b in zip(direct.entries, batched.entries, strict=True):
        if a.stats is not None:
            assert_same(a.stats, b.stats)
            padded += "padded" in a.stats
    assert padded > 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", ["stats", "full"])
def test_no_synchronisation_in_a_cuda_forward(tmp_path: Path, mode: str) -> None:
    """On CUDA, torch raises at any synchronising call while a captured forward runs: a
    stack of blocks whose own forward does not synchronise (transformers' mask code does),
    bf16 and fp32 records, 40 of them."""
    blocks = [torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(),
                                  torch.nn.LayerNorm(64)) for _ in range(10)]
    model = torch.nn.Sequential(*blocks, torch.nn.Linear(64, 8)).cuda().eval()
    x = torch.randn(4, 16, 64, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad():
            model(x.to(dtype))  # warm up (allocations, kernels)
        with torch.no_grad(), precision.capture(model, tmp_path / "c.st", mode=mode,
                                                force=True) as cap:
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x.to(dtype))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert len(cap.entries) > 40
        if mode == "stats":
            assert all("norm" in e["stats"] for e in cap.entries if "stats" in e)

"""The one-pass kernel of CPU statistics (precision.runtime.capture.onepass) against torch's
reductions (the fallback without numba) and an independent float64 numpy computation."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from precision.dumps.sketch import BUCKETS, PERIOD, count_sketch, decode  # noqa: E402
from precision.kernel_choice import KERNEL_ENV  # noqa: E402
from precision.runtime.capture import onepass, tensorstats  # noqa: E402
from precision.runtime.capture.tensorstats import tensor_stats  # noqa: E402
from tests.test_deferred import assert_same, records  # noqa: E402


def both(x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], ...]:
    """``tensor_stats(x)`` with torch's reductions, then with the one-pass kernel (which must
    run: its calls are counted)."""
    monkeypatch.setenv(KERNEL_ENV, "numpy")
    torch_path = tensor_stats(x, detail=True)
    monkeypatch.setenv(KERNEL_ENV, "auto")
    assert tensorstats.fused_kernel() is onepass  # loaded (and warmed) before counting
    calls = []
    original = onepass.one_pass

    def counted(*a: Any) -> Any:
        calls.append(1)
        return original(*a)

    monkeypatch.setattr(onepass, "one_pass", counted)
    fused = tensor_stats(x, detail=True)
    monkeypatch.undo()
    # one call, or one per piece of a long record (onepass.parts)
    assert len(calls) == (len(onepass.parts(x.numel(), torch.get_num_threads()))
                          if x.numel() else 0)
    return torch_path, fused


def reference(x: torch.Tensor) -> dict[str, Any]:
    """float64 numpy statistics of a finite record (no torch reduction involved)."""
    v = x.detach().double().numpy().ravel()
    return {"min": v.min(), "max": v.max(), "mean": v.mean(), "std": v.std(),
            "norm": math.sqrt(float(np.dot(v, v))), "sketch": count_sketch([v])}


def assert_reference(st: dict[str, Any], x: torch.Tensor) -> None:
    """Extrema exact; mean within ``δ(n)`` of the rms, std and norm within 1e-8 relative
    (the kernel's bound: 5e-9 for the std, ``δ(n)`` for the norm); each bucket of the sketch
    within float32 rounding of its value (plus ``δ(n)`` of the norm)."""
    ref = reference(x)
    n = x.numel()
    rms = ref["norm"] / math.sqrt(n)
    assert (st["min"], st["max"]) == (ref["min"], ref["max"])
    assert st["mean"] == pytest.approx(ref["mean"], rel=0,
                                       abs=4 * onepass.error_bound(n) * rms + 1e-300)
    assert st["std"] == pytest.approx(ref["std"], rel=1e-8, abs=1e-300)
    assert st["norm"] == pytest.approx(ref["norm"], rel=1e-12)
    y = decode(st["sketch"])
    assert y is not None
    np.testing.assert_allclose(y, ref["sketch"], rtol=2.0**-24,
                               atol=onepass.error_bound(n) * ref["norm"])


@pytest.mark.parametrize("index", range(len(records())))
def test_one_pass_equals_torch_reductions_on_every_branch(
        index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain, half precision, a mean far above the spread, NaN/inf/masked, beyond fp16,
    integers, strided, empty, scalar, fp16's lowest, flush-to-zero values: counts and
    extrema equal, sums within the torch path's float32 rounding; records with neither
    NaN, inf nor masked values also match numpy's float64 figures."""
    x = records()[index]
    torch_path, fused = both(x, monkeypatch)
    assert_same(torch_path, fused)
    if "sketch" in fused and fused["nan"] == fused["masked"] == 0 and fused["posinf"] == 0:
        assert_reference(fused, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_one_pass_matches_float64_numpy_in_every_dtype(
        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lengths around a row of 1021 and a transposed (non-contiguous) view."""
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(1, generator=g), torch.randn(1021, generator=g),
              torch.randn(1022, generator=g) * 5 - 2,
              torch.randn(300, 41, generator=g).t()):
        x = x.to(dtype)
        torch_path, fused = both(x, monkeypatch)
        assert_same(torch_path, fused)
        assert_reference(fused, x)


def test_one_pass_over_more_than_one_period_of_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record past one period (the second flipped by its own sign), in bfloat16 (too long
    for the staging buffer): numpy's float64 sketch, and a norm that float32 sums miss."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(PERIOD + 5000, generator=g) + 0.5).to(torch.bfloat16)
    torch_path, fused = both(x, monkeypatch)
    assert_reference(fused, x)
    for key in ("min", "max", "nan", "masked", "beyond_fp16", "near_fp16_max"):
        assert torch_path[key] == fused[key]
    # torch's float32 sums of 4.2M elements: off by about 4e-5 here
    assert torch_path["std"] == pytest.approx(fused["std"], rel=1e-4)


def test_cancelling_variance_is_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 record of mean 1e8 and spread 1: ``Σx²/n - mean²`` loses every digit in
    float64 (1e16 against 1), so the kernel's bound sends it to the two-pass variance."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5000, generator=g, dtype=torch.float64) + 1e8
    monkeypatch.setenv(KERNEL_ENV, "auto")
    st = tensor_stats(x)
    assert st["std"] == pytest.approx(x.numpy().std(), rel=1e-9)
    total, squares, *_ = onepass.summary(x.numpy())
    naive = squares / x.numel() - (total / x.numel()) ** 2
    assert naive != pytest.approx(x.numpy().var(), rel=1e-3)  # what it would have been


def test_kernel_env_numpy_keeps_torch_reductions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, "numpy")
    assert tensorstats.fused_kernel() is None
    monkeypatch.setenv(KERNEL_ENV, "")
    assert tensorstats.fused_kernel() is onepass


def test_without_numba_the_torch_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where numba cannot load, the kernel is remembered as absent and torch computes."""
    monkeypatch.setattr(tensorstats, "_FUSED", False)
    monkeypatch.setenv(KERNEL_ENV, "")
    assert tensorstats.fused_kernel() is None
    x = torch.randn(2000, generator=torch.Generator().manual_seed(6))
    assert_same(tensor_stats(x), tensor_stats(x))


def test_order_keys_give_the_extrema_and_reveal_nan() -> None:
    for dtype in (np.float32, np.float64):
        a = np.array([-0.5, 3.0, -np.inf, 2.0], dtype)
        assert onepass.summary(a)[2:4] == (-np.inf, 3.0)
        for nan in (np.nan, -np.nan):
            _, _, lo, hi, _ = onepass.summary(np.array([1.0, nan, -2.0], dtype))
            assert math.isnan(lo) or math.isnan(hi)


def test_pieces_cover_the_record_in_whole_rows() -> None:
    """Each piece starts at a multiple of 1021 (its rows are the record's), holds at least
    PARALLEL_MIN elements (the last, a row per piece short of it at worst), and together
    they cover the record once."""
    small = onepass.PARALLEL_MIN
    assert onepass.parts(small * 2 - 1, 4) == [(0, small * 2 - 1)]
    for n in (small * 2, small * 3 + 17, PERIOD + 5000, 10 * small):
        for threads in (1, 2, 3, 8):
            pieces = onepass.parts(n, threads)
            assert 1 <= len(pieces) <= threads
            assert pieces[0][0] == 0 and pieces[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
            assert all(lo % BUCKETS == 0 for lo, _ in pieces)
            assert all(hi - lo >= small for lo, hi in pieces[:-1])
            assert pieces[-1][1] - pieces[-1][0] > small - len(pieces) * BUCKETS
            assert len(pieces) == min(threads, n // small)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_record_in_pieces_is_the_record_whole(dtype: type) -> None:
    """Taken in 2, 3 or 4 pieces at once (one crossing a period of signs), a record's sums
    are within the kernel's bound of the whole pass's, its extrema and sketch the same
    (each bucket within float64 rounding of adding the pieces' sketches)."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal(PERIOD + 3 * onepass.PARALLEL_MIN) * 3 + 1).astype(dtype)
    s, s2, lo, hi, y = onepass.summary(a)
    bound = onepass.error_bound(a.size)
    for threads in (2, 3, 4):
        assert len(onepass.parts(a.size, threads)) == threads
        ps, ps2, plo, phi, py = onepass.record_summary(a, threads)
        assert (plo, phi) == (lo, hi) == (a.min(), a.max())
        assert ps == pytest.approx(s, rel=0, abs=2 * bound * float(np.abs(a).sum()))
        assert ps2 == pytest.approx(s2, rel=2 * bound)
        np.testing.assert_allclose(py, y, rtol=0, atol=4 * bound * math.sqrt(s2))
    np.testing.assert_allclose(y, count_sketch([a.astype(np.float64)]), rtol=0,
                               atol=4 * bound * math.sqrt(s2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_piece_in_a_later_period_is_signed_as_numpy_signs_it(dtype: type) -> None:
    """A piece that starts in the third period of signs (flipped or not by σ of its period)
    and runs into the fourth: each bucket is numpy's float64 sum of ``s(i) x_i`` over the
    same elements in the same order (the kernel negates by the sign bit, exactly), zeros
    and negative zeros included; the sums and extrema are the piece's own."""
    from precision.dumps.sketch import signs

    rng = np.random.default_rng(11)
    offset = 2 * PERIOD + 7 * BUCKETS
    a = rng.standard_normal(PERIOD).astype(dtype)
    a[:5] = (0.0, -0.0, 1.0, -1.0, np.finfo(dtype).max / 4)
    s, _, lo, hi, y = onepass.summary(a, offset)
    wide = a.astype(np.float64)
    bucket = np.arange(offset, offset + a.size) % BUCKETS
    expected = np.bincount(bucket, weights=signs(offset, a.size) * wide, minlength=BUCKETS)
    np.testing.assert_allclose(y, expected, rtol=1e-15, atol=0)
    assert (lo, hi) == (a.min(), a.max())
    assert s == pytest.approx(wide.sum(), rel=0, abs=onepass.error_bound(a.size)
                              * float(np.abs(wide).sum()))


def test_nan_or_inf_in_a_later_piece_is_not_lost() -> None:
    """A NaN or an infinity in any piece leaves non-finite extrema (the exact path then
    counts them), never a finite max taken over a NaN."""
    n = 4 * onepass.PARALLEL_MIN
    for bad in (np.nan, np.inf, -np.inf):
        for where in (5, n // 2 + 3, n - 1):
            a = np.ones(n, np.float32)
            a[where] = bad
            lo, hi = onepass.record_summary(a, 4)[2:4]
            assert not (np.isfinite(lo) and np.isfinite(hi)), (bad, where)


def test_the_pool_is_made_again_in_a_forked_child() -> None:
    """A child forked after the pool was made has the pool's object but none of its
    threads: the child makes its own rather than waiting on threads that do not exist."""
    import os

    a = np.ones(4 * onepass.PARALLEL_MIN, np.float32)
    onepass.record_summary(a, 2)
    ready: list[int] = []
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer within the test's time or not at all
        try:
            ok = onepass.record_summary(a, 2)[0] == a.size
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    try:
        import select

        ready, _, _ = select.select([r], [], [], 30)
        answer = os.read(r, 1) if ready else b""
    finally:
        os.close(r)
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert answer == b"1"



def test_the_kernel_without_its_sketch_gives_the_same_sums() -> None:
    """``sketch=False`` (what scripts/bench times to measure the sketch's share): the same
    extrema and, within the kernel's bound (the compiler may order the additions another
    way without the sketch), the same sums; no sketch."""
    for dtype in (np.float32, np.float64):
        a = (np.random.default_rng(8).standard_normal(3 * BUCKETS + 5) * 7).astype(dtype)
        whole, bare = onepass.summary(a), onepass.summary(a, sketch=False)
        assert whole[2:4] == bare[2:4] == (a.min(), a.max())
        bound = onepass.error_bound(a.size)
        assert bare[0] == pytest.approx(whole[0], rel=0, abs=2 * bound * float(np.abs(a).sum()))
        assert bare[1] == pytest.approx(whole[1], rel=2 * bound)
        assert whole[4].any() and not bare[4].any()


def test_a_cpu_stats_capture_finds_its_kernel_once(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Any) -> None:
    """The kernel is looked up when the capture opens, not at each record (where the lookup
    runs cold between two operations of the forward), and every record uses it."""
    import precision
    from precision.runtime.capture import recorder
    from tests.test_deferred import feed, tiny_llama

    monkeypatch.setenv(KERNEL_ENV, "auto")
    lookups, passes = [], []
    original, one = tensorstats.fused_kernel, onepass.one_pass

    def counted() -> Any:
        lookups.append(1)
        return original()

    def kernel(*a: Any) -> Any:
        passes.append(1)
        return one(*a)

    monkeypatch.setattr(tensorstats, "fused_kernel", counted)
    monkeypatch.setattr(recorder, "fused_kernel", counted)
    monkeypatch.setattr(onepass, "one_pass", kernel)
    model = tiny_llama(3)
    with torch.no_grad(), precision.capture(model, tmp_path / "s.st", mode="stats") as cap:
        model(**feed())
    stats = [e for e in cap.entries if "stats" in e]
    assert len(stats) > 20 and len(passes) >= len(stats) - 4  # the ids go through float64
    assert len(lookups) == 1


def test_a_kernel_given_is_the_one_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tensor_stats(kernel=None)`` takes torch's reductions whatever the environment says,
    ``kernel=onepass`` the one pass, and the default asks the environment."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(8))
    monkeypatch.setenv(KERNEL_ENV, "auto")
    torch_path, fused = tensor_stats(x, kernel=None), tensor_stats(x, kernel=onepass)
    assert not np.array_equal(torch_path["sketch"], fused["sketch"])  # float32 vs float64 sums
    assert_same(torch_path, fused)
    monkeypatch.setenv(KERNEL_ENV, "numpy")
    assert np.array_equal(tensor_stats(x)["sketch"], torch_path["sketch"])
    assert np.array_equal(tensor_stats(x, kernel=onepass)["sketch"], fused["sketch"])


def capture_statistics(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    """The ``statistics`` metadata of a stats capture of a small model (``kw`` for the
    capture)."""
    import precision

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    path = tmp_path / "s.st"
    with torch.no_grad(), precision.capture(model, path, mode="stats", force=True, **kw):
        model(torch.randn(2, 8))
    statistics: dict[str, Any] = precision.load(path).meta["statistics"]
    return statistics


def test_a_stats_dump_says_what_computed_its_statistics(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """The one-pass kernel, torch's reductions as ``PRECISION_KERNEL=numpy`` asks, or the
    deferred path: each is named in the dump; a value the variable does not take is an
    error, before any file is written."""
    from precision.errors import InputError

    monkeypatch.setenv(KERNEL_ENV, "auto")
    assert capture_statistics(tmp_path) == {"path": "onepass"}
    assert capture_statistics(tmp_path, deferred=True) == {"path": "deferred"}
    monkeypatch.setenv(KERNEL_ENV, "numba")
    assert capture_statistics(tmp_path) == {"path": "onepass"}
    monkeypatch.setenv(KERNEL_ENV, "numpy")
    assert capture_statistics(tmp_path) == {"path": "torch", "why": "PRECISION_KERNEL=numpy"}
    monkeypatch.setenv(KERNEL_ENV, "fast")
    (tmp_path / "s.st").unlink()
    with pytest.raises(InputError, match="PRECISION_KERNEL=fast: use numpy, numba or auto"):
        capture_statistics(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_kernel_that_does_not_load_is_named(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """A kernel that fails to load (a stale numba cache, LLVM under a memory limit) falls
    back on torch's reductions, and the dump says so and why; ``PRECISION_KERNEL=numba``
    makes it an error instead. An absent numba is named as such."""
    import sys

    import precision.runtime.capture as capture_package
    from precision.errors import InputError

    def stale() -> None:
        raise RuntimeError("cannot load cached kernel\nsecond line")

    monkeypatch.setenv(KERNEL_ENV, "auto")
    monkeypatch.setattr(tensorstats, "_FUSED", None)
    monkeypatch.setattr(onepass, "warm", stale)
    assert capture_statistics(tmp_path) == {
        "path": "torch",
        "why": "the one-pass kernel did not load (RuntimeError: cannot load cached kernel)"}
    monkeypatch.setenv(KERNEL_ENV, "numba")
    (tmp_path / "s.st").unlink()
    with pytest.raises(InputError, match=r"PRECISION_KERNEL=numba, but the one-pass kernel "
                                         r"did not load \(RuntimeError"):
        capture_statistics(tmp_path)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setenv(KERNEL_ENV, "auto")
    monkeypatch.setattr(tensorstats, "_FUSED", None)
    monkeypatch.setitem(sys.modules, "numba", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "precision.runtime.capture.onepass")
    monkeypatch.delattr(capture_package, "onepass")
    assert capture_statistics(tmp_path)["why"] == (
        "numba is not installed (pip install 'precision[fast]')")


def test_the_capture_command_says_when_the_kernel_did_not_load(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``precision capture`` in stats mode says, in its log, that the statistics fell back on
    torch's reductions and why; inspect shows what computed them; nothing is said when the
    kernel loads or ``PRECISION_KERNEL=numpy`` asked for torch."""
    from click.testing import CliRunner

    from precision.cli import main
    from tests.conftest import FIXTURES

    def capture(out: Path) -> str:
        r = CliRunner().invoke(main, ["capture", "--model", str(FIXTURES / "tiny-flan-t5"),
                                      "--mode", "stats", "--prompt", "hi", "-o", str(out)])
        assert r.exit_code == 0, r.output
        return r.output

    def inspect(path: Path) -> str:
        r = CliRunner().invoke(main, ["inspect", str(path)])
        assert r.exit_code == 0, r.output
        return r.output

    monkeypatch.setenv(KERNEL_ENV, "auto")
    assert "statistics by torch" not in capture(tmp_path / "a.st")
    assert "statistics by the one-pass kernel (float64 sums)" in inspect(tmp_path / "a.st")
    monkeypatch.setenv(KERNEL_ENV, "numpy")
    assert "statistics by torch" not in capture(tmp_path / "b.st")
    assert ("statistics by torch's reductions (float32 sums): PRECISION_KERNEL=numpy"
            in inspect(tmp_path / "b.st").replace("\n", " "))

    def stale() -> None:
        raise RuntimeError("cannot load cached kernel")

    monkeypatch.setenv(KERNEL_ENV, "auto")
    monkeypatch.setattr(tensorstats, "_FUSED", None)
    monkeypatch.setattr(onepass, "warm", stale)
    assert ("statistics by torch's reductions, slower: the one-pass kernel did not load "
            "(RuntimeError: cannot load cached kernel)") in capture(tmp_path / "c.st")

"""Dump format: DumpWriter round trips, safetensors compatibility, atomicity, reader errors."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from precision.dumps import load
from precision.dumps.dump import FORMAT_NAME, DumpWriter
from precision.errors import DumpError

# name -> sample array (every dtype the format stores, odd shapes included)
SAMPLES: dict[str, np.ndarray] = {
    "float32": np.array([[1.5, -2.25, 3e38], [0.0, -0.0, 1e-40]], dtype=np.float32),
    "float16": np.array([1.0, -65504.0, 6e-8, np.inf], dtype=np.float16),
    "bfloat16": np.array([1.5, -3.0e38, 0.0078125], dtype=ml_dtypes.bfloat16),
    "int64": np.array([[-(2**62), 0, 2**62 + 7]], dtype=np.int64),
    "int32": np.arange(-5, 7, dtype=np.int32).reshape(3, 2, 2),
    "bool": np.array([True, False, True, True]),
    "uint8": np.arange(0, 256, 17, dtype=np.uint8),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "scalar": np.array(42.5, dtype=np.float32),
}


def _buffer(arr: np.ndarray) -> bytes:
    """The raw bytes of ``arr`` (bf16 arrays do not export the buffer protocol)."""
    return np.ascontiguousarray(arr).tobytes()


def _write(path: Path, arrays: dict[str, np.ndarray], meta: dict | None = None,
           **kwargs: object) -> Path:
    """Write ``arrays`` with DumpWriter and close it with ``meta``."""
    w = DumpWriter(path, **kwargs)
    for key, arr in arrays.items():
        w.write(key, arr.dtype.name, arr.shape, _buffer(arr))
    return w.close(meta if meta is not None else {"note": "test"})


def _raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    """A safetensors-shaped file with an arbitrary JSON header."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _precision_md(meta: str = "{}", version: str = "1") -> dict[str, str]:
    return {"format": FORMAT_NAME, "format_version": version, "meta": meta}


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()


@pytest.fixture
def sample_dump(tmp_path: Path) -> Path:
    """A dump holding every sample tensor."""
    return _write(tmp_path / "all.st", SAMPLES, {"mode": "full", "x": [1, 2]})


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip_each_dtype(tmp_path: Path, name: str) -> None:
    """Every dtype and shape reads back bit-identical, with its metadata."""
    arr = SAMPLES[name]
    path = _write(tmp_path / f"{name}.st", {"t": arr}, {"hello": "world"})
    d = load(path)
    assert d.meta == {"hello": "world"}
    assert d.tensors["t"].dtype == arr.dtype.name
    assert d.tensors["t"].shape == arr.shape
    _assert_same(d["t"], arr)


def test_round_trip_all_in_one_file(sample_dump: Path) -> None:
    """Several dtypes side by side keep their order and values."""
    d = load(sample_dump)
    assert d.keys() == list(SAMPLES)
    assert d.meta == {"mode": "full", "x": [1, 2]}
    for key, arr in SAMPLES.items():
        _assert_same(d[key], arr)


def test_writer_accepts_ndarray_and_memoryview(tmp_path: Path) -> None:
    """``write`` takes contiguous ndarrays and memoryviews, not only bytes."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.int64)
    w = DumpWriter(tmp_path / "v.st")
    w.write("a", "float32", a.shape, a)
    w.write("b", "int64", b.shape, memoryview(b))
    d = load(w.close({}))
    _assert_same(d["a"], a)
    _assert_same(d["b"], b)


def test_writer_accepts_empty_multidim_ndarray(tmp_path: Path) -> None:
    """An empty (0, 3) ndarray is a contiguous buffer and should be accepted as is."""
    arr = np.zeros((0, 3), dtype=np.float32)
    w = DumpWriter(tmp_path / "e.st")
    try:
        w.write("e", "float32", arr.shape, arr)
    finally:
        w.abort()


def test_real_safetensors_numpy_reads_dump(sample_dump: Path) -> None:
    """safetensors.numpy reads every non-bf16 tensor with the same values."""
    loaded = load_file(str(sample_dump))
    for key, arr in SAMPLES.items():
        if arr.dtype.name == "bfloat16":
            continue
        _assert_same(loaded[key], arr)


def test_real_safetensors_torch_reads_dump(sample_dump: Path) -> None:
    """safe_open(framework='pt') reads every tensor, bf16 included, and the metadata."""
    import torch

    with safe_open(str(sample_dump), framework="pt") as f:
        assert set(f.keys()) == set(SAMPLES)
        md = f.metadata()
        assert md["format"] == FORMAT_NAME
        assert json.loads(md["meta"]) == {"mode": "full", "x": [1, 2]}
        for key, arr in SAMPLES.items():
            t = f.get_tensor(key)
            assert tuple(t.shape) == arr.shape
            if arr.dtype.name == "bfloat16":
                assert t.dtype == torch.bfloat16
                got = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                got = t.numpy()
            _assert_same(got, arr)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 1000])
def test_chunks_reassemble(sample_dump: Path, n: int) -> None:
    """chunks(key, n) yields pieces of at most n elements that rebuild the flat tensor."""
    d = load(sample_dump)
    for key, arr in SAMPLES.items():
        parts = [p.copy() for p in d.chunks(key, n)]  # pieces share one buffer
        assert all(0 < p.size <= n for p in parts)
        flat = arr.reshape(-1)
        rebuilt = np.concatenate(parts) if parts else np.empty(0, dtype=arr.dtype)
        _assert_same(rebuilt, flat)


def test_unknown_key_is_dump_error(sample_dump: Path) -> None:
    """Asking for a key the dump lacks is a DumpError, not a KeyError."""
    d = load(sample_dump)
    with pytest.raises(DumpError, match="nope"):
        d["nope"]
    with pytest.raises(DumpError, match="nope"):
        next(d.chunks("nope", 4))


# --------------------------------------------------------------------------- header space


def test_header_fits_reserved_space(tmp_path: Path) -> None:
    """With the default reserve the data starts right after the reserved header region."""
    a = np.arange(10, dtype=np.float32)
    reserve = 4096
    path = _write(tmp_path / "r.st", {"a": a}, reserve=reserve)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n + 8 == reserve
    assert path.stat().st_size == reserve + a.nbytes
    _assert_same(load(path)["a"], a)
    _assert_same(load_file(str(path))["a"], a)


def test_header_too_big_falls_back_to_rewrite(tmp_path: Path) -> None:
    """A tiny reserve with many keys takes the rewrite path and still gives a valid file."""
    arrays = {f"layer.{i}.weight": np.full(i % 5 + 1, i, dtype=np.float32) for i in range(200)}
    arrays["mask"] = np.array([True, False])
    path = _write(tmp_path / "big.st", arrays, {"entries_note": "x" * 5000}, reserve=16)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (n + 8) % 8 == 0
    assert path.stat().st_size == 8 + n + sum(a.nbytes for a in arrays.values())
    d = load(path)
    assert d.meta == {"entries_note": "x" * 5000}
    assert d.keys() == list(arrays)
    real = load_file(str(path))
    for key, arr in arrays.items():
        _assert_same(d[key], arr)
        _assert_same(real[key], arr)
    assert sorted(os.listdir(tmp_path)) == ["big.st"]  # no temporary files left


# --------------------------------------------------------------------------- atomicity


def test_destination_appears_only_on_close(tmp_path: Path) -> None:
    """Before close() the destination does not exist; afterwards only it remains."""
    dest = tmp_path / "out.st"
    w = DumpWriter(dest)
    w.write("a", "float32", (2,), np.ones(2, dtype=np.float32))
    assert not dest.exists()
    w.close({})
    assert dest.exists()
    assert os.listdir(tmp_path) == ["out.st"]


def test_abort_leaves_no_file(tmp_path: Path) -> None:
    """abort() removes the temporary file and creates no destination."""
    w = DumpWriter(tmp_path / "out.st")
    w.write("a", "float32", (2,), np.ones(2, dtype=np.float32))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_abort_keeps_existing_destination(tmp_path: Path) -> None:
    """abort() with force leaves an existing destination byte for byte."""
    dest = tmp_path / "out.st"
    dest.write_bytes(b"precious old contents")
    w = DumpWriter(dest, force=True)
    w.write("a", "float32", (2,), np.ones(2, dtype=np.float32))
    w.abort()
    assert dest.read_bytes() == b"precious old contents"
    assert os.listdir(tmp_path) == ["out.st"]


def test_force_overwrites_on_close(tmp_path: Path) -> None:
    """With force the old file stays until close() replaces it."""
    dest = tmp_path / "out.st"
    dest.write_bytes(b"old")
    w = DumpWriter(dest, force=True)
    w.write("a", "int32", (1,), np.array([7], dtype=np.int32))
    assert dest.read_bytes() == b"old"
    w.close({})
    assert load(dest)["a"].tolist() == [7]


# --------------------------------------------------------------------------- writer errors


def test_duplicate_key(tmp_path: Path) -> None:
    """Writing the same key twice is a DumpError."""
    w = DumpWriter(tmp_path / "d.st")
    w.write("a", "float32", (1,), np.ones(1, dtype=np.float32))
    with pytest.raises(DumpError, match="duplicate"):
        w.write("a", "float32", (1,), np.ones(1, dtype=np.float32))
    w.abort()


@pytest.mark.parametrize(("dtype", "shape", "nbytes"), [
    ("float32", (3,), 8),
    ("float16", (2, 2), 16),
    ("int64", (), 4),
    ("bfloat16", (0,), 2),
])
def test_byte_size_mismatch(tmp_path: Path, dtype: str, shape: tuple[int, ...],
                            nbytes: int) -> None:
    """A buffer whose size does not match dtype x shape is a DumpError."""
    w = DumpWriter(tmp_path / "m.st")
    with pytest.raises(DumpError, match="do not match"):
        w.write("a", dtype, shape, b"\0" * nbytes)
    w.abort()


def test_unsupported_dtype_rejected_cleanly(tmp_path: Path) -> None:
    """An unsupported dtype is a DumpError and does not corrupt later tensors."""
    w = DumpWriter(tmp_path / "c.st")
    try:
        with pytest.raises(DumpError):
            w.write("c", "complex64", (1,), np.zeros(1, dtype=np.complex64))
    finally:
        good = np.array([1.0, 2.0], dtype=np.float32)
        w.write("a", "float32", good.shape, good)
        path = w.close({})
    _assert_same(load(path)["a"], good)


def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    """An existing output is refused without force and left alone."""
    dest = tmp_path / "out.st"
    dest.write_bytes(b"keep me")
    with pytest.raises(DumpError, match="already exists"):
        DumpWriter(dest)
    assert dest.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["out.st"]


def test_missing_parent_folder(tmp_path: Path) -> None:
    """An output in a missing folder is refused before anything is created."""
    with pytest.raises(DumpError, match="does not exist"):
        DumpWriter(tmp_path / "nowhere" / "out.st")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_directory_as_output(tmp_path: Path, force: bool) -> None:
    """A directory is never a valid output, with or without force."""
    (tmp_path / "dir.st").mkdir()
    with pytest.raises(DumpError, match="is a directory"):
        DumpWriter(tmp_path / "dir.st", force=force)
    assert os.listdir(tmp_path) == ["dir.st"]


# --------------------------------------------------------------------------- reader errors


def _expect_dump_error(path: Path, match: str | None = None) -> DumpError:
    """load(path) raises DumpError (nothing else) naming the file."""
    with pytest.raises(DumpError, match=match) as info:
        load(path)
    assert path.name in str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    _expect_dump_error(tmp_path / "missing.st", "no such file")


def test_directory_input(tmp_path: Path) -> None:
    (tmp_path / "adir.st").mkdir()
    _expect_dump_error(tmp_path / "adir.st", "directory")


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"], ids=["empty", "3-bytes"])
def test_too_short(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "short.st"
    p.write_bytes(content)
    _expect_dump_error(p, "too short")


def test_header_length_beyond_file(tmp_path: Path) -> None:
    p = tmp_path / "long.st"
    p.write_bytes(struct.pack("<Q", 1000) + b'{"a":1}')
    _expect_dump_error(p, "header length")


def test_huge_header_length(tmp_path: Path) -> None:
    """A garbage length (random bytes) is refused without allocating it."""
    p = tmp_path / "garbage.st"
    p.write_bytes(b"\xff" * 64)
    _expect_dump_error(p, "not a precision dump or safetensors file")


@pytest.mark.parametrize("blob", [b"not json at all", b"\xff\xfe\x00bad", b"", b"{"],
                         ids=["text", "binary", "zero-length", "truncated"])
def test_header_not_json(tmp_path: Path, blob: bytes) -> None:
    p = tmp_path / "notjson.st"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob)
    _expect_dump_error(p, "not valid JSON")


@pytest.mark.parametrize("header", [[1, 2], "text", 3, None])
def test_header_not_object(tmp_path: Path, header: object) -> None:
    _expect_dump_error(_raw_file(tmp_path / "list.st", header), "not a JSON object")


def test_unknown_dtype_tag(tmp_path: Path) -> None:
    p = _raw_file(tmp_path / "tag.st",
                  {"a": {"dtype": "F8_E4M3X", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    _expect_dump_error(p, "F8_E4M3X")


@pytest.mark.parametrize("spec", [
    {"dtype": "F32", "shape": [2]},
    {"dtype": "F32", "shape": 3, "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [3], "data_offsets": [0]},
    {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 12]},
    "F32",
    {"dtype": "F32", "shape": [-3], "data_offsets": [0, 12]},
    {"dtype": "F32", "shape": [3], "data_offsets": [12, 0]},
], ids=["no-offsets", "shape-int", "one-offset", "shape-str", "spec-str", "neg-shape",
        "reversed"])
def test_malformed_tensor_entry(tmp_path: Path, spec: object) -> None:
    _expect_dump_error(_raw_file(tmp_path / "spec.st", {"a": spec}, b"\0" * 12))


@pytest.mark.parametrize(("dtype", "shape", "offsets"), [
    ("F32", [3], [0, 8]),
    ("F16", [2, 2], [0, 12]),
    ("BF16", [], [0, 4]),
    ("F32", [0, 4], [0, 4]),
])
def test_shape_offset_mismatch(tmp_path: Path, dtype: str, shape: list[int],
                               offsets: list[int]) -> None:
    p = _raw_file(tmp_path / "size.st",
                  {"a": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}, b"\0" * 16)
    _expect_dump_error(p, "does not match")


@pytest.mark.parametrize("cut", [1, 3, 8])
def test_truncated_dump(sample_dump: Path, cut: int) -> None:
    """A real dump missing its last bytes is refused at open time."""
    data = sample_dump.read_bytes()
    sample_dump.write_bytes(data[:-cut])
    _expect_dump_error(sample_dump, "beyond the end")


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    _expect_dump_error(_raw_file(tmp_path / "ovl.st", header, b"\0" * 12), "overlap")


def test_future_format_version(tmp_path: Path) -> None:
    p = _raw_file(tmp_path / "v2.st", {"__metadata__": _precision_md("{}", version="2")})
    _expect_dump_error(p, "version 2")


@pytest.mark.parametrize("meta", ["{not json", "", "[1, 2]", '"text"'],
                         ids=["broken", "empty", "list", "string"])
def test_meta_not_json_object(tmp_path: Path, meta: str) -> None:
    p = _raw_file(tmp_path / "meta.st", {"__metadata__": _precision_md(meta)})
    _expect_dump_error(p, "metadata")


def test_metadata_not_object(tmp_path: Path) -> None:
    _expect_dump_error(_raw_file(tmp_path / "md.st", {"__metadata__": ["x"]}), "__metadata__")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_header_must_be_plain_utf8(tmp_path: Path, sample_dump: Path, encoding: str) -> None:
    """safetensors reads the header as UTF-8 alone; json.loads of bytes would also take
    UTF-16/32 and a byte-order mark, so a file no other reader opens passed."""
    p = _raw_file(tmp_path / "ok.st", {"a": {"dtype": "F32", "shape": [1],
                                             "data_offsets": [0, 4]}}, b"\0" * 4)
    load(p)  # the same header in UTF-8 opens
    blob = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    raw = blob.encode(encoding)
    bad = tmp_path / "enc.st"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    _expect_dump_error(bad, "not valid JSON")


def test_metadata_values_must_be_strings(tmp_path: Path) -> None:
    md = _precision_md("{}")
    _raw_file(tmp_path / "ok.st", {"__metadata__": md})
    load(tmp_path / "ok.st")
    p = _raw_file(tmp_path / "md.st", {"__metadata__": md | {"format_version": 1}})
    _expect_dump_error(p, "not a string")


def test_missing_format_version(tmp_path: Path) -> None:
    md = {"format": FORMAT_NAME, "meta": "{}"}
    _expect_dump_error(_raw_file(tmp_path / "nov.st", {"__metadata__": md}),
                       "has no format_version: corrupt$")


def test_metadata_field_given_twice(tmp_path: Path) -> None:
    """A field twice in the metadata JSON: json.loads keeps the last, silently (an fp32
    dump that also says 'dtype': 'bfloat16' was judged under bf16's limits)."""
    once = '{"mode": "full", "dtype": "float32"}'
    load(_raw_file(tmp_path / "once.st", {"__metadata__": _precision_md(once)}))
    twice = '{"mode": "full", "dtype": "float32", "dtype": "bfloat16"}'
    p = _raw_file(tmp_path / "twice.st", {"__metadata__": _precision_md(twice)})
    _expect_dump_error(p, "holds the field 'dtype' twice")


def test_tensor_field_given_twice_is_not_called_a_tensor(tmp_path: Path) -> None:
    blob = b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}'
    p = tmp_path / "field.st"
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    err = _expect_dump_error(p, "holds the key 'dtype' twice")
    assert "tensor 'dtype'" not in str(err)


def test_unknown_dtype_is_named_as_a_dtype(tmp_path: Path) -> None:
    p = _raw_file(tmp_path / "f17.st",
                  {"a": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    err = _expect_dump_error(p, "tensor 'a' has dtype 'F17'")
    assert "field" not in str(err)


def _aliased(tmp_path: Path, alias: dict) -> Path:
    """A full dump of one stored record and one alias entry ``alias`` (a new file)."""
    entries = [{"key": "m:out", "module": "m", "kind": "out", "index": "", "call": 0,
                "shape": [2, 3], "dtype": "float32"},
               {"module": "n", "kind": "out", "index": "", "call": 0} | alias]
    return _write(tmp_path / f"al{len(list(tmp_path.iterdir()))}.st",
                  {"m:out": np.zeros((2, 3), np.float32)}, {"mode": "full", "entries": entries})


def test_alias_checked_against_the_record_it_names(tmp_path: Path) -> None:
    good = {"key": "n:out", "shape": [2, 3], "dtype": "float32", "alias_of": "m:out"}
    load(_aliased(tmp_path, good))
    _expect_dump_error(_aliased(tmp_path, good | {"shape": [3], "dtype": "int8"}),
                       "alias of 'm:out', float32\\[2, 3\\]: corrupt")
    _expect_dump_error(_aliased(tmp_path, good | {"alias_of": "gone:out"}),
                       "alias of 'gone:out', which the dump does not store")


@pytest.mark.parametrize("md", [
    _precision_md(json.dumps({"entries": 5})),
    _precision_md(json.dumps({"entries": ["a"]})),
    _precision_md(json.dumps({"entries": [{"module": "m"}]})),
    {"format": FORMAT_NAME, "format_version": "1", "meta": 5},
], ids=["entries-int", "entries-str-items", "entry-without-key", "meta-int"])
def test_malformed_entries_are_dump_errors(tmp_path: Path, md: dict) -> None:
    _expect_dump_error(_raw_file(tmp_path / "entries.st", {"__metadata__": md}))


# --------------------------------------------------------------------------- foreign files


def test_plain_safetensors_file(tmp_path: Path) -> None:
    """A safetensors file from the real library loads, entries in file (offset) order."""
    arrays = {"zeta": np.arange(3, dtype=np.float32), "alpha": np.ones((2, 2), np.int64),
              "mid": np.array([True]), "empty": np.zeros((0,), np.float16)}
    p = tmp_path / "plain.safetensors"
    save_file(arrays, str(p), metadata={"format": "pt"})
    d = load(p)
    assert d.meta["foreign"] is True
    assert d.mode == "full"
    in_file = sorted(d.tensors, key=lambda k: d.tensors[k].start)
    assert [e.key for e in d.entries] == in_file == d.keys()
    assert [e.order for e in d.entries] == list(range(len(arrays)))
    assert set(in_file) == set(arrays)
    for e in d.entries:
        assert e.kind == "out"
        assert e.shape == arrays[e.key].shape
        assert e.dtype == arrays[e.key].dtype.name
        _assert_same(d[e.key], arrays[e.key])


def test_plain_file_without_metadata(tmp_path: Path) -> None:
    """No __metadata__ at all is a foreign file too."""
    p = _raw_file(tmp_path / "bare.st",
                  {"b": {"dtype": "I32", "shape": [1], "data_offsets": [4, 8]},
                   "a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}},
                  struct.pack("<ii", 11, 22))
    d = load(p)
    assert d.meta["foreign"] is True
    assert [e.key for e in d.entries] == ["a", "b"]
    assert d["a"].tolist() == [11]
    assert d["b"].tolist() == [22]


# --------------------------------------------------------------------------- count sketches


def _stats_meta(sketches: list[object]) -> dict:
    """A stats-mode record list whose records hold these sketches (None: none)."""
    entries = []
    for i, s in enumerate(sketches):
        stats: dict = {"numel": 4, "nan": 0, "norm": 1.0}
        if s is not None:
            stats["sketch"] = s
        entries.append({"key": f"m.l.{i}:out", "module": f"m.l.{i}", "kind": "out",
                        "index": "", "call": 0, "shape": [4], "dtype": "float32",
                        "stats": stats})
    return {"mode": "stats", "entries": entries}


def test_sketches_are_one_float32_table_beside_the_records(tmp_path: Path) -> None:
    """Each record's sketch goes to a row of one float32 tensor, the header keeps only the
    row's number; reading gives each record its row back (float32 rounding of the values
    captured), and the table is no record's tensor. The caller's metadata is not changed."""
    from precision.dumps.dump import SKETCHES_KEY
    from precision.dumps.sketch import BUCKETS, decode, encode

    rng = np.random.default_rng(0)
    ys = [rng.standard_normal(BUCKETS) * 10 ** i for i in range(3)]
    # as captured (an array), as an older dump kept it (base64 text), none, the first format
    meta = _stats_meta([ys[0], encode(ys[1]), None, [1.0, 2.0, 3.0], ys[2].astype("f4")])
    before = json.dumps(meta, default=lambda a: a.tolist())
    path = _write(tmp_path / "s.st", {}, meta)
    assert json.dumps(meta, default=lambda a: a.tolist()) == before
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header[SKETCHES_KEY]["dtype"] == "F32"
    assert header[SKETCHES_KEY]["shape"] == [3, BUCKETS]
    assert len(header["__metadata__"]["meta"]) < 2000  # no sketch text in the header
    d = load(path)
    assert SKETCHES_KEY not in d.tensors and d.keys() == []
    got = [e.stats.get("sketch") if e.stats else None for e in d.entries]
    for i, want in ((0, ys[0]), (1, ys[1]), (4, ys[2])):
        assert isinstance(got[i], np.ndarray)
        np.testing.assert_array_equal(got[i], want.astype(np.float32))
        assert "sketch_row" not in d.entries[i].stats
    assert got[2] is None
    # a sketch of another size stays in the header (as text)
    assert isinstance(got[3], str)
    np.testing.assert_array_equal(decode(got[3]), [1.0, 2.0, 3.0])


def test_a_sketch_float32_cannot_hold_is_left_out(tmp_path: Path) -> None:
    from precision.dumps.sketch import BUCKETS

    y = np.ones(BUCKETS) * 1e39  # finite in float64, inf in float32
    d = load(_write(tmp_path / "s.st", {}, _stats_meta([y, np.ones(BUCKETS)])))
    assert "sketch" not in d.entries[0].stats
    np.testing.assert_array_equal(d.entries[1].stats["sketch"], np.ones(BUCKETS, "f4"))


def test_dumps_with_sketches_as_header_text_still_read(tmp_path: Path) -> None:
    """A dump written before the table (2026-12-01 to 12-07): base64 text in the header."""
    from precision.dumps.sketch import BUCKETS, decode, encode

    y = np.arange(BUCKETS, dtype=np.float64)
    md = _precision_md(json.dumps(_stats_meta([encode(y)])))
    d = load(_raw_file(tmp_path / "old.st", {"__metadata__": md}))
    np.testing.assert_array_equal(decode(d.entries[0].stats["sketch"]), y)


@pytest.mark.parametrize("row, table, match", [
    (5, ("F32", [2, 1021]), "names sketch row 5 of 2"),
    (-1, ("F32", [2, 1021]), "names sketch row -1"),
    ("0", ("F32", [2, 1021]), "names sketch row '0'"),
    (True, ("F32", [2, 1021]), "names sketch row True"),
    (0, ("F64", [2, 1021]), "not a float32 table"),
    (0, ("F32", [2042]), "not a float32 table"),
    (0, None, "holds no '__sketches__' tensor"),
], ids=["beyond", "negative", "text", "bool", "float64", "flat", "no-table"])
def test_a_broken_sketch_table_is_a_dump_error(tmp_path: Path, row: object, table: object,
                                               match: str) -> None:
    md = _precision_md(json.dumps(_stats_meta([None])))
    meta = json.loads(md["meta"])
    meta["entries"][0]["stats"]["sketch_row"] = row
    md["meta"] = json.dumps(meta)
    header: dict = {"__metadata__": md}
    data = b""
    if table is not None:
        dtype, shape = table
        size = int(np.prod(shape)) * (8 if dtype == "F64" else 4)
        header["__sketches__"] = {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}
        data = bytes(size)
    _expect_dump_error(_raw_file(tmp_path / "bad.st", header, data), match)


def test_a_row_named_twice_or_not_finite_is_a_dump_error(tmp_path: Path) -> None:
    md = _precision_md(json.dumps(_stats_meta([None, None])))
    meta = json.loads(md["meta"])
    for e in meta["entries"]:
        e["stats"]["sketch_row"] = 0
    header = {"__metadata__": md | {"meta": json.dumps(meta)},
              "__sketches__": {"dtype": "F32", "shape": [1, 1021], "data_offsets": [0, 4084]}}
    _expect_dump_error(_raw_file(tmp_path / "twice.st", header, bytes(4084)),
                       "names sketch row 0 of 1")
    meta["entries"].pop()
    header["__metadata__"] = md | {"meta": json.dumps(meta)}
    nan = np.full(1021, np.nan, np.float32).tobytes()
    _expect_dump_error(_raw_file(tmp_path / "nan.st", header, nan), "hold NaN or inf")

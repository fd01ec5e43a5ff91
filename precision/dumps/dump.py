"""Read and write precision dumps: safetensors files with JSON metadata.

A dump is a valid safetensors file (``8-byte little-endian header length``, a JSON
header, then the tensor bytes). Its ``__metadata__`` holds ``format`` =
``precision-dump``, ``format_version`` and ``meta``: one JSON document describing the
capture (see ``docs/format.md``). Reading needs numpy and ml_dtypes only, never torch,
and never unpickles anything.

Writing is streamed: tensor bytes are appended as they arrive behind a reserved header
region, and :meth:`DumpWriter.close` writes the header in front and renames the temporary
file into place, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import (
    NAME_TO_SAFETENSORS,
    SAFETENSORS_TO_NAME,
    canonical,
    is_float,
    numpy_dtype,
    short,
)
from ..dtypes import itemsize as dtype_itemsize
from ..errors import DumpError, PrecisionError
from .atomic import DISK_FULL, AtomicFile, format_bytes
from .meta import ComputeSettings
from .sketch import BUCKETS
from .sketch import decode as decode_sketch
from .sketch import encode as encode_sketch
from .sketch import valid as valid_sketch

FORMAT_NAME = "precision-dump"
FORMAT_VERSION = 1
#: the tensor holding a dump file's count sketches, a row each (float32, rows x buckets): a
#: stats record's ``sketch_row`` names its row (precision.dumps.sketch)
SKETCHES_KEY = "__sketches__"
_MAX_HEADER = 256 * 1024 * 1024  # refuse absurd header lengths before allocating
_ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file: ``dtype`` name, ``shape`` and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: Path | None = None  # the shard holding it, for directory dumps

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Entry:
    """One captured record in execution order.

    ``key`` is ``module:kind[.index][#call]`` (:func:`precision.dumps.keys.parse_key`);
    ``stats`` is set for stats-mode records; ``alias_of`` names an earlier key holding the
    same tensor; ``signature`` is the call's plain arguments, when it had any.
    """

    key: str
    module: str
    kind: str
    index: str
    call: int
    order: int
    shape: tuple[int, ...]
    dtype: str
    stats: dict[str, Any] | None = None
    alias_of: str | None = None
    signature: str | None = None


# --------------------------------------------------------------------------- writing


class DumpWriter:
    """Streams tensors into ``path`` atomically.

    Bytes go to a hidden temporary file next to ``path`` (an
    :class:`~precision.dumps.atomic.AtomicFile`) behind ``reserve`` bytes kept for the header.
    :meth:`close` writes the header into that space (or, when it is too small, writes a new
    file with the header in front and a kernel-side copy of the data), flushes and renames
    into place. The rename makes the dump atomic against a killed or crashed process;
    ``fsync=True`` also forces the bytes to disk before the rename, against power loss, at the
    cost of waiting for it. Any failure, a full disk included, removes the temporary file.
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False,
                 reserve: int = 64 * 1024, fsync: bool = False) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._out = AtomicFile(self.path, force=force, tag=f"-{os.getpid()}", fsync=fsync)
        self._file = self._out.file
        self._reserve = max(_ALIGN * 2, reserve - reserve % _ALIGN)
        with self._out.guard(self._reserve):
            self._file.truncate(self._reserve)
            self._file.seek(self._reserve)
        self._offset = 0
        self._header: dict[str, dict[str, Any]] = {}

    def write(self, key: str, dtype: str, shape: tuple[int, ...], data: Any) -> None:
        """Append one tensor; ``data`` is a buffer (bytes, memoryview, contiguous ndarray)."""
        if key in self._header:
            raise DumpError(f"duplicate tensor key {key!r} while writing {self.path}")
        if dtype not in NAME_TO_SAFETENSORS:
            raise DumpError(f"tensor {key!r}: dtype {dtype!r} cannot be stored in a dump")
        if isinstance(data, np.ndarray):  # any shape, bf16 included
            flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            view = memoryview(flat)  # type: ignore[arg-type]
        else:
            view = memoryview(data).cast("B")
        itemsize = dtype_itemsize(dtype)
        if view.nbytes != math.prod(shape) * itemsize:
            raise DumpError(f"tensor {key!r}: {view.nbytes} bytes do not match "
                            f"{dtype}{list(shape)}")
        with self._out.guard(self._reserve + self._offset + view.nbytes):
            self._file.write(view)
        self._header[key] = {
            "dtype": NAME_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [self._offset, self._offset + view.nbytes],
        }
        self._offset += view.nbytes

    def close(self, meta: dict[str, Any]) -> Path:
        """Write the header with ``meta`` and move the file into place; returns the path.
        The records' count sketches go into one tensor (:data:`SKETCHES_KEY`), each
        record's ``stats.sketch`` replaced by its ``sketch_row`` (``meta`` is not changed)."""
        meta, rows = _sketches_apart(meta)
        if rows:
            table = np.stack(rows).astype("<f4", copy=False)
            self.write(SKETCHES_KEY, "float32", table.shape, table)
        header: dict[str, Any] = dict(self._header)
        header["__metadata__"] = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "meta": json.dumps(meta, separators=(",", ":"), allow_nan=False),
        }
        blob = json.dumps(header, separators=(",", ":")).encode()
        needed = max(self._reserve, len(blob) + 8 + _ALIGN) + self._offset
        with self._out.guard(needed):
            self._file.flush()
            if len(blob) + 8 > self._reserve:
                return self._rewrite_with_header(blob, needed)
            blob = blob.ljust(self._reserve - 8, b" ")
            self._file.seek(0)
            self._file.write(struct.pack("<Q", len(blob)) + blob)
        return self._out.commit(needed)

    def _rewrite_with_header(self, blob: bytes, needed: int) -> Path:
        """The header did not fit the reserved space: write the final file anew, the header in
        front and the data copied behind it, then drop the first one."""
        blob = blob + b" " * (-(len(blob) + 8) % _ALIGN)
        final = AtomicFile(self.path, force=True, tag=f"-{os.getpid()}-final", fsync=self._fsync)
        with final.guard(needed):
            final.file.write(struct.pack("<Q", len(blob)) + blob)
            final.file.flush()
            self._copy_data(final.file)
        final.commit(needed)
        self._out.discard()
        return self.path

    def _copy_data(self, out: Any) -> None:
        """Copy the tensor bytes behind the new header: in the kernel where the platform can
        (``copy_file_range``), through a buffer otherwise (macOS, some filesystems)."""
        remaining, src_off = self._offset, self._reserve
        try:
            while remaining:
                n = os.copy_file_range(self._file.fileno(), out.fileno(), remaining,
                                       src_off, out.tell())
                if n <= 0:
                    break
                out.seek(n, os.SEEK_CUR)
                src_off += n
                remaining -= n
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise
        except AttributeError:
            pass
        if remaining:
            self._file.seek(src_off)
            shutil.copyfileobj(self._file, out, 16 * 1024 * 1024)

    def abort(self) -> None:
        """Drop the temporary file; the destination is left untouched. Never raises: a close
        that fails (a full disk while flushing) still removes the file."""
        self._out.discard()


def _sketches_apart(meta: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
    """``meta`` with each record's sketch of the current size (``BUCKETS`` values: an array,
    or text or a list from an older dump) replaced by ``sketch_row``, and the rows in
    order; copies of the records it changes, the rest shared. A sketch of another size (the
    first format's 31) stays in the record as text; one that float32 cannot hold (beyond its
    range) is left out, as for a record with NaN or inf."""
    entries = meta.get("entries")
    if not isinstance(entries, list):
        return meta, []
    rows: list[np.ndarray] = []
    out = []
    for e in entries:
        stats = e.get("stats") if isinstance(e, dict) else None
        value = stats.get("sketch") if isinstance(stats, dict) else None
        if isinstance(value, np.ndarray) and value.dtype == np.float32 and value.ndim == 1:
            row = value  # as captured
        else:
            y = None if value is None else decode_sketch(value)
            if y is None:  # none (or not a sketch: the reader's check will say so)
                out.append(e)
                continue
            with np.errstate(over="ignore"):  # beyond float32: inf, left out below
                row = y.astype(np.float32)
        assert isinstance(stats, dict)
        rest = {k: v for k, v in stats.items() if k != "sketch"}
        if not np.isfinite(row).all():
            out.append(e | {"stats": rest})
        elif row.size == BUCKETS:
            out.append(e | {"stats": rest | {"sketch_row": len(rows)}})
            rows.append(row)
        else:
            out.append(e | {"stats": rest | {"sketch": encode_sketch(row)}})
    return meta | {"entries": out}, rows


def _attach_sketches(p: Path, meta: dict[str, Any], info: TensorInfo | None) -> None:
    """Put each row of the file's sketch tensor (``info``, None where it has none) into its
    record's stats as ``sketch``, in place of ``sketch_row``; a row number out of range or
    used twice, or a tensor that is no float32 table of finite values, is a corrupt dump."""
    entries = meta.get("entries")
    if not isinstance(entries, list):  # none (plain safetensors), or malformed: _entries says
        return
    if info is None:
        named = next((e.get("key") for e in entries
                      if isinstance(e, dict) and isinstance(e.get("stats"), dict)
                      and "sketch_row" in e["stats"]), None)
        if named is not None:
            raise DumpError(f"{p}: record {named!r} names a sketch row but the file holds no "
                            f"{SKETCHES_KEY!r} tensor: corrupt dump")
        return
    if info.dtype != "float32" or len(info.shape) != 2:
        raise DumpError(f"{p}: tensor {SKETCHES_KEY!r} is {info.dtype}{list(info.shape)}, "
                        "not a float32 table of count sketches: corrupt dump")
    table = np.empty(info.shape, dtype="<f4")
    fd = os.open(p, os.O_RDONLY)
    try:
        _read_exact(p, fd, info.start, table)
    finally:
        os.close(fd)
    if not np.isfinite(table).all():
        raise DumpError(f"{p}: the count sketches hold NaN or inf: corrupt dump")
    used = set()
    for e in entries:
        stats = e.get("stats") if isinstance(e, dict) else None
        if not isinstance(stats, dict) or "sketch_row" not in stats:
            continue
        row = stats.pop("sketch_row")
        if not (isinstance(row, int) and not isinstance(row, bool)
                and 0 <= row < info.shape[0]) or row in used:
            raise DumpError(f"{p}: record {e.get('key')!r} names sketch row {row!r} of "
                            f"{info.shape[0]}: corrupt dump")
        used.add(row)
        stats["sketch"] = table[row]


# --------------------------------------------------------------------------- reading


@dataclass
class Dump:
    """A dump opened for reading: metadata, entries in execution order, lazy tensor access.

    Tensors are read from the file on request (``dump[key]`` or :meth:`chunks`), so opening
    a large dump costs only its header.
    """

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, TensorInfo]
    entries: list[Entry] = field(default_factory=list)

    # ---- basic facts
    @property
    def mode(self) -> str:
        """``full`` (tensors stored) or ``stats`` (statistics only)."""
        return str(self.meta.get("mode", "full"))

    @property
    def dtype(self) -> str | None:
        """The capture's compute dtype (``float16`` ...), if recorded."""
        value = self.meta.get("dtype")
        return str(value) if value else None

    @property
    def compute(self) -> ComputeSettings | None:
        """The device's precision settings at capture time (``meta["compute"]``), if any."""
        value = self.meta.get("compute")
        return value if isinstance(value, dict) else None  # type: ignore[return-value]

    @property
    def common_float_dtype(self) -> str | None:
        """The most common float dtype of the module outputs, else of all records (what a run
        with no recorded dtype, a Python capture or another tool's file, most likely computed
        in; a training step's gradients are recorded in fp32 whatever it computed in, and
        the operations inside modules (``--level ops``) often upcast: a Gated DeltaNet's
        delta rule computes in fp32 in a bf16 model, so operations count only where no
        module output is recorded)."""
        outs = [e for e in self.entries if is_float(e.dtype) and e.kind == "out"]
        floats = ([e.dtype for e in outs if "/" not in e.module] or [e.dtype for e in outs]
                  or [e.dtype for e in self.entries if is_float(e.dtype)])
        return max(set(floats), key=floats.count) if floats else None

    @property
    def config_hash(self) -> str | None:
        """The model's config hash, if recorded (see
        :func:`precision.runtime.models.identity.model_identity`)."""
        value = self.meta.get("model", {}).get("config_hash")
        return str(value) if value else None

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", True))

    def entry(self, key: str) -> Entry | None:
        return self._by_key.get(key)

    def __post_init__(self) -> None:
        self._by_key = {e.key: e for e in self.entries}

    def __contains__(self, key: object) -> bool:
        """True for stored tensors and for aliases of them."""
        return key in self.tensors or (isinstance(key, str) and self.resolve(key) is not None)

    def resolve(self, key: str) -> str | None:
        """The stored key holding ``key``'s data: itself, or the key it aliases."""
        if key in self.tensors:
            return key
        e = self._by_key.get(key)
        if e is not None and e.alias_of in self.tensors:
            return e.alias_of
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self) -> list[str]:
        """Keys of stored tensors, in file order."""
        return list(self.tensors)

    @property
    def file_bytes(self) -> int:
        """Bytes on disk: the file, or every shard file of a directory dump."""
        files = {t.file for t in self.tensors.values() if t.file} or {self.path}
        return sum(f.stat().st_size for f in files if f.is_file())

    def __repr__(self) -> str:
        m = self.meta  # a Python capture records no device or dtype: derive them
        device = (m.get("device") or {}).get("name") or (m.get("compute") or {}).get(
            "device_type")
        dtype = self.dtype or self.common_float_dtype
        where = (f" on {device}" if device else "") + (f" in {short(dtype)}" if dtype else "")
        return (f"<Dump {self.path.name}: {m.get('model', {}).get('class', 'unknown model')}"
                f"{where}, {self.mode} mode, {len(self.entries)} records, "
                f"{len(self.tensors)} tensors, {format_bytes(self.file_bytes)}>")

    # ---- tensor access
    def __getitem__(self, key: str) -> np.ndarray:
        info = self._info(key)
        out = np.empty(info.shape, dtype=numpy_dtype(info.dtype))
        fd = os.open(info.file or self.path, os.O_RDONLY)
        try:
            self._read_into(fd, info.start, out.reshape(-1).view(np.uint8))
        finally:
            os.close(fd)
        return out

    def chunks(self, key: str, chunk_elems: int) -> Iterator[np.ndarray]:
        """Yield the flattened tensor in pieces of at most ``chunk_elems`` elements.

        The yielded arrays share one buffer: use each before asking for the next.
        """
        info = self._info(key)
        dt = numpy_dtype(info.dtype)
        buf = np.empty(max(1, min(chunk_elems, info.numel)), dtype=dt)
        pos = info.start
        fd = os.open(info.file or self.path, os.O_RDONLY)
        try:
            for first in range(0, info.numel, chunk_elems):
                n = min(chunk_elems, info.numel - first)
                part = buf[:n]
                self._read_into(fd, pos, part.view(np.uint8))
                pos += n * dt.itemsize
                yield part
        finally:
            os.close(fd)

    def _info(self, key: str) -> TensorInfo:
        stored = self.resolve(key)
        if stored is None:
            raise DumpError(f"{self.path}: no tensor {key!r} in this dump")
        return self.tensors[stored]

    def _read_into(self, fd: int, pos: int, out: np.ndarray) -> None:
        _read_exact(self.path, fd, pos, out)


def _read_exact(path: Path, fd: int, pos: int, out: np.ndarray) -> None:
    """Fill ``out`` with the bytes of ``fd`` from ``pos`` on (short reads continued)."""
    view = memoryview(out).cast("B")  # type: ignore[arg-type]
    done = 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], pos + done)
        if got <= 0:
            raise DumpError(f"{path}: file ends inside tensor data (truncated?)")
        done += got


def load_file(path: str | os.PathLike[str]) -> Dump:
    """Open one dump file (or any safetensors file), checking its header against the file.

    Directory dumps are opened by :func:`precision.dumps.load`, which calls this per shard.
    """
    p = Path(path)
    if not p.exists():
        raise DumpError(f"{p}: no such file")
    if not p.is_file():  # a FIFO or a device: reading would wait forever, or never end
        raise DumpError(f"{p}: not a regular file (a pipe or a device): give a dump file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(9)
        if len(head) < 8:
            raise DumpError(f"{p}: file too short to be a safetensors dump ({size} bytes)")
        (n,) = struct.unpack("<Q", head[:8])
        if n == 0 and size > 8:
            raise DumpError(f"{p}: an unfinished capture (the process stopped before writing "
                            f"its index), {size} bytes that cannot be read: delete it")
        if n > min(size - 8, _MAX_HEADER):
            if head[8:9] != b"{":  # no JSON header follows: not safetensors at all
                text = all(32 <= c < 127 or c in b"\t\r\n" for c in head)
                kind = "a text file" if text else "no safetensors header"
                raise DumpError(f"{p}: not a precision dump or safetensors file ({kind})")
            raise DumpError(f"{p}: header length {n} exceeds the file size ({size} bytes): "
                            "truncated (an interrupted copy?)")
        f.seek(8)
        raw = f.read(n)
    try:
        # strict UTF-8, as safetensors reads it (json.loads of bytes would take UTF-16/32)
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DumpError(f"{p}: header is not valid JSON: not a precision dump or "
                        "safetensors file") from None
    except RecursionError:
        raise DumpError(f"{p}: header JSON is nested too deeply: not a precision dump or "
                        "safetensors file") from None
    except DuplicateKey as dup:
        raise DumpError(f"{p}: the header holds the key {dup.args[0]!r} twice: corrupt "
                        "(a reader would silently take one of them)") from None
    if not isinstance(header, dict):
        raise DumpError(f"{p}: header is not a JSON object")
    meta_raw = header.pop("__metadata__", None) or {}
    tensors = _parse_tensors(p, header, data_start=8 + n, size=size)
    meta = _parse_meta(p, meta_raw)
    if not meta.get("foreign"):
        _attach_sketches(p, meta, tensors.pop(SKETCHES_KEY, None))
    try:
        entries = _entries(meta, tensors)
    except (TypeError, KeyError, ValueError, AttributeError, OverflowError) as exc:
        why = f" ({exc})" if "listed twice" in str(exc) else ""
        raise DumpError(f"{p}: the record list in the dump metadata is malformed{why}") from None
    logits = meta.get("logits_key")
    if logits is not None and logits not in tensors and all(e.key != logits for e in entries):
        raise DumpError(f"{p}: the metadata names {logits!r} as the logits, a record the dump "
                        "does not hold: corrupt metadata")
    by_key = {e.key: e for e in entries}
    for e in entries:
        t = tensors.get(e.key)
        if t is not None and (t.shape != e.shape or t.dtype != e.dtype):
            raise DumpError(f"{p}: record {e.key!r} says {e.dtype}{list(e.shape)} but the "
                            f"tensor is {t.dtype}{list(t.shape)}: corrupt metadata")
        if e.alias_of is not None:
            _check_alias(p, e, by_key.get(e.alias_of))
    return Dump(path=p, meta=meta, tensors=tensors, entries=entries)


def _check_alias(p: Path, e: Entry, stored: Entry | None) -> None:
    """An alias names a record the dump stores (not another alias), of its own shape and
    dtype: it is the very same tensor."""
    if stored is None or stored.alias_of is not None:
        raise DumpError(f"{p}: record {e.key!r} is an alias of {e.alias_of!r}, which the dump "
                        "does not store: corrupt metadata")
    if (stored.shape, stored.dtype) != (e.shape, e.dtype):
        raise DumpError(f"{p}: record {e.key!r} says {e.dtype}{list(e.shape)} but is an alias "
                        f"of {e.alias_of!r}, {stored.dtype}{list(stored.shape)}: corrupt "
                        "metadata")


class DuplicateKey(Exception):
    """A JSON object with the same key twice (raised by :func:`no_duplicates`)."""


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook`` that refuses a key given twice in one object
    (plain ``json.loads`` keeps the last, silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _parse_tensors(p: Path, header: dict[str, Any], *, data_start: int,
                   size: int) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for key, spec in header.items():
        try:
            if spec["dtype"] not in SAFETENSORS_TO_NAME:
                raise DumpError(f"{p}: tensor {key!r} has dtype {spec['dtype']!r}, not one "
                                "this reader knows: corrupt or from a newer tool")
            dtype = SAFETENSORS_TO_NAME[spec["dtype"]]
            if not isinstance(spec["shape"], list) or not isinstance(spec["data_offsets"], list):
                raise TypeError
            if not all(_whole(x) for x in (*spec["shape"], *spec["data_offsets"])):
                raise TypeError  # 1.7 read as 1, 1e30 as a size no array can have
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except KeyError as exc:
            raise DumpError(f"{p}: tensor {key!r} has unknown or missing field {exc}") from None
        except (TypeError, ValueError, OverflowError):
            raise DumpError(f"{p}: tensor {key!r} has a malformed header entry") from None
        if any(s < 0 for s in shape) or begin < 0 or end < begin:
            raise DumpError(f"{p}: tensor {key!r} has a negative shape or offsets")
        if (end - begin) != math.prod(shape) * dtype_itemsize(dtype):
            raise DumpError(f"{p}: tensor {key!r} byte size {end - begin} does not match "
                            f"{dtype}{list(shape)}")
        if data_start + end > size:
            raise DumpError(f"{p}: tensor {key!r} lies beyond the end of the file (truncated?)")
        infos[key] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    spans = sorted((t.start, t.end) for t in infos.values() if t.end > t.start)
    for (_, e1), (s2, _) in itertools.pairwise(spans):
        if s2 < e1:
            raise DumpError(f"{p}: tensors overlap in the file: corrupt header")
    return dict(sorted(infos.items(), key=lambda kv: kv[1].start))


def _parse_meta(p: Path, meta_raw: Any) -> dict[str, Any]:
    if not isinstance(meta_raw, dict):
        raise DumpError(f"{p}: __metadata__ is not a JSON object")
    if not all(isinstance(v, str) for v in meta_raw.values()):
        raise DumpError(f"{p}: __metadata__ holds a value that is not a string: corrupt "
                        "(safetensors readers refuse it)")
    if meta_raw.get("format") != FORMAT_NAME:
        return {"mode": "full", "foreign": True}
    if "format_version" not in meta_raw:
        raise DumpError(f"{p}: the dump metadata has no format_version: corrupt")
    version = meta_raw["format_version"]
    if version != str(FORMAT_VERSION):
        raise DumpError(f"{p}: dump format version {version} is not supported by this "
                        f"precision (reads version {FORMAT_VERSION}): upgrade precision")
    try:
        meta = json.loads(meta_raw.get("meta", "{}"), object_pairs_hook=no_duplicates)
    except (TypeError, json.JSONDecodeError, RecursionError):
        raise DumpError(f"{p}: dump metadata is not valid JSON") from None
    except DuplicateKey as dup:
        raise DumpError(f"{p}: the dump metadata holds the field {dup.args[0]!r} twice: "
                        "corrupt (a reader would silently take one of them)") from None
    check_meta_fields(p, meta)
    return meta


#: metadata fields a reader relies on, and the JSON types each may have (None: absent/null)
META_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (dict,), "device": (dict,), "policy": (dict,), "env": (dict,),
    "module_dtypes": (dict,), "logits_key": (str, type(None)), "logits_keys": (list,),
    "dtype": (str, type(None)), "mode": (str,), "entries": (list,),
}


def check_meta_fields(p: Path, meta: Any) -> None:
    """Refuse metadata whose fields have other types than this reader expects (a hand-edited
    or foreign file): one line, not a traceback deep in compare or inspect."""
    if not isinstance(meta, dict):
        raise DumpError(f"{p}: dump metadata is not a JSON object")
    for name, kinds in META_FIELDS.items():
        if name in meta and not isinstance(meta[name], kinds):
            raise DumpError(f"{p}: dump metadata field {name!r} has type "
                            f"{type(meta[name]).__name__}, not what a dump holds there: corrupt")
    if meta.get("dtype") is not None:
        try:
            canonical(meta["dtype"])
        except PrecisionError:
            raise DumpError(f"{p}: dump metadata field 'dtype' is {meta['dtype']!r}, no dtype "
                            "this reader knows: corrupt") from None
    if meta.get("mode", "full") not in ("full", "stats"):
        raise DumpError(f"{p}: dump metadata field 'mode' is {meta['mode']!r}: corrupt")
    if not all(isinstance(k, str) for k in meta.get("logits_keys", [])):
        raise DumpError(f"{p}: dump metadata field 'logits_keys' holds a non-string: corrupt")
    policy = meta.get("policy", {})
    if not isinstance(policy.get("base", ""), str) or not all(
            isinstance(g, str) for g in policy.get("globs", []) or []):
        raise DumpError(f"{p}: dump metadata field 'policy' is malformed: corrupt")


def _entries(meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> list[Entry]:
    raw = meta.get("entries")
    if raw is None:  # plain safetensors: every tensor, in file order
        return [Entry(key=k, module=k, kind="out", index="", call=0, order=i,
                      shape=t.shape, dtype=t.dtype) for i, (k, t) in enumerate(tensors.items())]
    if not isinstance(raw, list):
        raise TypeError("entries is not a list")
    entries = []
    keys: set[str] = set()
    for i, e in enumerate(raw):
        texts = [e["key"], e.get("module", e["key"]), e.get("kind", "out"), e.get("index", ""),
                 e.get("dtype", "float32")]
        shape = e.get("shape", [])
        stats = e.get("stats")
        alias = e.get("alias_of")
        signature = e.get("signature")
        if (not all(isinstance(s, str) for s in texts) or not isinstance(shape, list)
                or not all(_whole(x) for x in shape) or not _whole(e.get("call", 0))
                or not (signature is None or isinstance(signature, str))
                or texts[4] not in NAME_TO_SAFETENSORS
                or not (alias is None or isinstance(alias, str))
                or not (stats is None or _valid_stats(stats))):
            raise TypeError(f"record {i}")
        if texts[0] in keys:
            raise ValueError(f"record {texts[0]!r} listed twice")
        if stats is not None and stats.get("numel", 0) > math.prod(int(s) for s in shape):
            raise ValueError(f"record {i}: more elements than its shape holds")
        keys.add(texts[0])
        entries.append(Entry(
            key=texts[0], module=texts[1], kind=texts[2], index=texts[3],
            call=int(e.get("call", 0)), order=i, shape=tuple(int(s) for s in shape),
            dtype=texts[4], stats=stats, alias_of=alias, signature=signature,
        ))
    return entries


def _whole(x: Any) -> bool:
    """A size, offset or call number as a dump writes it: an int from 0 to 2^63 - 1."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


#: a stats record's element counts
COUNT_FIELDS = ("numel", "nan", "posinf", "neginf", "masked", "beyond_fp16", "near_fp16_max",
                "padded", "flush_fp16")


def _valid_stats(stats: Any) -> bool:
    """A stats record: a dict of numbers (or null where there were no finite values), and
    optionally a ``sketch`` of finite values (a row of the file's sketch table, checked
    with it; or, in an older dump, base64 text or the first format's list of numbers:
    :func:`precision.dumps.sketch.valid`) and a ``checksum`` of the tensor's bytes
    another tool wrote (msprobe's md5/xor summary: up to 64 letters and digits)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def count(v: Any) -> bool:  # an element count: a whole number, 0 or more, not inf
        return number(v) and math.isfinite(v) and v >= 0 and v == int(v)

    if isinstance(stats, dict) and not all(count(stats[k]) for k in COUNT_FIELDS if k in stats):
        return False
    return isinstance(stats, dict) and all(
        (isinstance(v, np.ndarray) or (isinstance(v, (list, str)) and valid_sketch(v)))
        if k == "sketch"
        else (isinstance(v, str) and 0 < len(v) <= 64 and v.isalnum()) if k == "checksum"
        else (v is None or number(v)) for k, v in stats.items())

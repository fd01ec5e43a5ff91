"""Arrays from numpy and torch files: ``.npy``, ``.npz`` and ``.pt``/``.pth``.

Each reader checks sizes before it allocates: an ``.npy`` header's shape must match the bytes
that follow it, an ``.npz`` member may not inflate beyond :data:`INFLATE_LIMIT` times the
archive, a ``.pt`` tensor may not hold more bytes than its file. Nothing is unpickled:
``.npy`` headers are parsed without ``allow_pickle``, ``.pt`` files are read with
``torch.load(weights_only=True)`` (torch is imported only here, and only for a ``.pt`` file).
"""

from __future__ import annotations

import math
import re
import tokenize
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from ...dtypes import bfloat16
from ...errors import DumpError
from .guard import LOGITS_KEY, one_line, storable

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
#: an ``.npz`` member may inflate to at most this many times the archive's size: real
#: arrays compress far less, a zip bomb far more
INFLATE_LIMIT = 64
_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}


def _looks_like(prefix: bytes) -> str:
    """What a file that is not the expected kind seems to be, for the error message."""
    if not prefix:
        return "the file is empty"
    if prefix.startswith(ZIP_MAGIC):
        return "it is a zip archive: an .npz or a .pt file?"
    if prefix.startswith(NPY_MAGIC):
        return "it is an .npy array"
    if prefix[:1] == b"\x80":
        return "it is a pickle, which is never loaded"
    return "no .npy header"


def read_npy(f: IO[bytes], size: int, src: str) -> np.ndarray:
    """The array in an ``.npy`` stream of ``size`` bytes, read only after its header's shape
    and dtype are checked against the bytes that follow."""
    prefix = f.read(8)
    if len(prefix) < 8 or not prefix.startswith(NPY_MAGIC):
        raise DumpError(f"{src}: not an .npy array ({_looks_like(prefix)})")
    version = (prefix[6], prefix[7])
    if version not in _HEADERS:
        raise DumpError(f"{src}: .npy format version {version[0]}.{version[1]} is not "
                        "supported (1.0 and 2.0 are)")
    try:
        shape, fortran, dtype = _HEADERS[version](f)
    except (ValueError, TypeError, SyntaxError, tokenize.TokenError) as exc:
        raise DumpError(f"{src}: the .npy header does not parse ({one_line(exc)})") from None
    if dtype.hasobject:
        raise DumpError(f"{src}: not a plain .npy array: it holds Python objects, which are "
                        "never unpickled")
    storable(np.empty(0, dtype), src)  # refuse an unstorable dtype before reading anything
    if any(n < 0 for n in shape):
        raise DumpError(f"{src}: the .npy header has a negative shape {list(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    left = size - f.tell()
    if nbytes != left:
        raise DumpError(f"{src}: the .npy header says {dtype}{list(shape)} ({nbytes} bytes) "
                        f"but {left} bytes follow it: truncated or corrupt")
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise DumpError(f"{src}: the file ends inside the array data (truncated)")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return storable(arr, src)


def npy_file(p: Path) -> np.ndarray:
    """The array in an ``.npy`` file, any dtype a dump can hold (big-endian byte-swapped)."""
    with open(p, "rb") as f:
        return read_npy(f, p.stat().st_size, str(p))


def npz_logits(p: Path) -> np.ndarray:
    """The array named ``logits`` in an ``.npz`` archive, or its only array."""
    with open(p, "rb") as f:
        prefix = f.read(8)
    if not prefix.startswith(ZIP_MAGIC):
        raise DumpError(f"{p}: not an .npz archive ({_looks_like(prefix)})")
    size = p.stat().st_size
    with zipfile.ZipFile(p) as z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        info = next((i for i in infos if i.filename == LOGITS_KEY + ".npy"), None)
        if info is None and len(infos) == 1 and names[0].endswith(".npy"):
            info = infos[0]
        if info is None:
            arrays = [n.removesuffix(".npy") for n in names]
            raise DumpError(f"{p}: holds {arrays}; name the logits array 'logits'")
        if info.file_size > INFLATE_LIMIT * size:
            raise DumpError(f"{p}: member {info.filename} inflates to {info.file_size} bytes, "
                            f"more than {INFLATE_LIMIT}x the archive: refused (a zip bomb?); "
                            "save the logits with np.save or np.savez")
        with z.open(info) as member:
            return read_npy(member, info.file_size, f"{p}:{info.filename}")


def _torch(src: str | Path) -> Any:
    try:
        import torch
    except ImportError:
        raise DumpError(f"{src}: reading a .pt file needs torch (pip install torch), or save "
                        "the logits as .npy/.safetensors instead") from None
    return torch


def pt_object(p: Path) -> Any:
    """What a ``.pt`` file holds, loaded with ``weights_only=True`` (tensors and containers
    only; a pickled object is refused and its code never runs)."""
    torch = _torch(p)
    size = p.stat().st_size
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            inflated = sum(i.file_size for i in z.infolist())
        if inflated > INFLATE_LIMIT * size:
            raise DumpError(f"{p}: its records inflate to {inflated} bytes, more than "
                            f"{INFLATE_LIMIT}x the file: refused (a zip bomb?)")
    try:
        with warnings.catch_warnings():  # torch's own warnings would print before the error
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads beyond tensors are refused here
        raise DumpError(f"{p}: not a file of tensors that torch.load(weights_only=True) reads "
                        f"({_unpickling_failure(exc)}); precision unpickles nothing else"
                        ) from None


def _unpickling_failure(exc: BaseException) -> str:
    """What torch's weights-only load refused, without its advice to load the file unsafely:
    the class a pickle names, or the unpickler's own words."""
    text = "".join(c if c.isprintable() or c == "\n" else "?" for c in str(exc))
    named = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if named:
        return f"it holds a pickled {named.group(1)[:80]}, not tensors"
    said = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if said and said.group(1).strip():
        return f"not a torch file: {said.group(1).strip()[:160]}"
    return one_line(exc, first_line=True).split(" In PyTorch")[0].rstrip(" .")


def tensor_array(t: Any, src: str, limit: int) -> np.ndarray:
    """A torch tensor as a numpy array (bfloat16 kept, via ml_dtypes), refusing what a dump
    cannot hold (float8, complex, quantized, sparse or meta tensors) and tensors of more
    than ``limit`` bytes (the file's size: a strided view cannot make more data than that)."""
    torch = _torch(src)
    if not isinstance(t, torch.Tensor):
        raise DumpError(f"{src}: expected a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise DumpError(f"{src}: a {t.layout} tensor; convert it with .to_dense() first")
    if t.is_quantized:
        raise DumpError(f"{src}: a quantized {t.dtype} tensor; dequantize it first")
    if t.device.type == "meta":
        raise DumpError(f"{src}: a tensor on the meta device holds no data")
    name = str(t.dtype).removeprefix("torch.")
    if name not in _TORCH_NAMES:
        raise DumpError(f"{src}: a {name} tensor cannot be held by a dump: convert it to "
                        "float32, float16 or bfloat16 first")
    if t.numel() * t.element_size() > limit:
        raise DumpError(f"{src}: a {name}{list(t.shape)} tensor of "
                        f"{t.numel() * t.element_size()} bytes from a file of {limit}: "
                        "refused (an expanded view?)")
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return np.asarray(t.view(torch.int16).numpy().view(bfloat16()))
    return storable(t.numpy(), src)


_TORCH_NAMES = frozenset({"float64", "float32", "float16", "bfloat16", "int64", "int32",
                          "int16", "int8", "uint8", "bool"})


def pt_logits(p: Path) -> np.ndarray:
    """The logits in a ``.pt`` file: a tensor, or a dict with a ``logits`` tensor."""
    obj = pt_object(p)
    if isinstance(obj, dict):
        obj = obj.get(LOGITS_KEY)
    torch = _torch(p)
    if not isinstance(obj, torch.Tensor):
        raise DumpError(f"{p}: expected a tensor or a dict with a 'logits' tensor")
    return tensor_array(obj, str(p), p.stat().st_size)


def pt_tensor(p: Path) -> np.ndarray:
    """The tensor a ``.pt`` file holds (as msprobe writes them), any dtype a dump holds."""
    return tensor_array(pt_object(p), str(p), p.stat().st_size)

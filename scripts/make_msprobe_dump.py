"""Write tests/data/msprobe-l1-qwen3: a real msprobe L1 tensor dump of the tiny Qwen3 fixture.

msprobe (PyPI ``mindstudio-probe``) is not a dependency of precision; install it apart from
the project's environment and put it on the path, e.g.::

    pip install --target /tmp/mssite --no-deps mindstudio-probe einops openpyxl et_xmlfile \
        pytz wheel tensorboard protobuf absl-py
    PYTHONPATH=/tmp/mssite:. .venv/bin/python scripts/make_msprobe_dump.py

The model is ``fixtures/tiny-qwen3`` cut to its first decoder layer (``num_hidden_layers=1``)
with eager attention, in fp32 on the CPU, on the token ids in ``inputs.json``: small enough
to commit (forward inputs and outputs of every API call, about 60 calls). The tests capture
precision's ops level of the same model and ids (:func:`load_model`) and compare the two.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-qwen3"
OUT = ROOT / "tests" / "data" / "msprobe-l1-qwen3"
IDS = [[5, 17, 42, 99, 3, 250]]


def load_model() -> Any:
    """The fixture as dumped: one decoder layer, eager attention, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        FIXTURE, num_hidden_layers=1, attn_implementation="eager").eval()


def main() -> None:
    import torch
    from msprobe.pytorch import PrecisionDebugger

    model = load_model()
    ids = torch.tensor(IDS)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({
            "task": "tensor", "dump_path": str(Path(tmp) / "dump"), "rank": [], "step": [],
            "level": "L1", "tensor": {"scope": [], "list": [], "data_mode": ["output"]}}))
        debugger = PrecisionDebugger(config_path=str(config))
        debugger.start(model)
        with torch.no_grad():
            model(input_ids=ids)
        debugger.stop()
        debugger.step()
        found = sorted((Path(tmp) / "dump").rglob("dump.json"))
        if len(found) != 1:
            sys.exit(f"expected one dump.json, found {found}")
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        doc = json.loads(found[0].read_text())
        doc["dump_data_dir"] = "dump_tensor_data"  # msprobe writes the absolute path
        (OUT / "dump.json").write_text(json.dumps(doc, indent=1) + "\n")
        shutil.copytree(found[0].parent / "dump_tensor_data", OUT / "dump_tensor_data")
    (OUT / "inputs.json").write_text(json.dumps({"input_ids": IDS}) + "\n")
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT.relative_to(ROOT)}: {len(doc['data'])} records, {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()

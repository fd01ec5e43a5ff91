"""Write real msprobe dumps of the tiny Qwen3 fixture under tests/data/.

- ``msprobe-l1-qwen3``: an L1 tensor dump of its first decoder layer (see below);
- ``msprobe/``: statistics dumps of the whole fixture (:func:`write_statistics`):
  ``fp32-train``, ``bf16-train`` and ``bf16-fault-train`` (L0, two training steps each:
  forward, backward and parameter gradients; msprobe's ``step<s>/proc<pid>`` layout, the
  process folder renamed ``proc0``), and forward dumps with checksums, ``fp32-md5``,
  ``bf16-md5`` (summary_mode md5: statistics and a CRC-32) and ``fp32-xor``,
  ``fp32-xor-again``, ``bf16-xor`` (summary_mode xor: a checksum only). The fault scales
  one output channel of layer 1's MLP down projection (``model.layers.1.mlp.down_proj``)
  by 8;
- ``msprobe/<model>-<dtype>``: statistics of real decoders' forward passes
  (SmolLM2-135M, Gemma 3 270M from ``$PRECISION_REAL_MODELS``) in fp32 and bf16;
- ``msprobe/ddp2-<dtype>``: a training step of the fixture under ``torchrun`` with two ranks
  (gloo) and DistributedDataParallel, each rank its half of the batch, in fp32 and bf16
  (msprobe's ``step0/rank<r>`` layout, records under DDP's ``module.``).

msprobe (PyPI ``mindstudio-probe``) is not a dependency of precision; install it apart from
the project's environment and put it on the path, e.g.::

    pip install --target /tmp/mssite --no-deps mindstudio-probe einops openpyxl et_xmlfile \
        pytz wheel tensorboard protobuf absl-py
    PYTHONPATH=/tmp/mssite:. .venv/bin/python scripts/make_msprobe_dump.py
    PYTHONPATH=/tmp/mssite:. .venv/bin/python scripts/make_msprobe_dump.py --statistics [NAME ...]
    PYTHONPATH=/tmp/mssite:. .venv/bin/python scripts/make_msprobe_dump.py --ranks [NAME ...]

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
sys.path.insert(0, str(ROOT / "scripts"))
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


STATS_OUT = ROOT / "tests" / "data" / "msprobe"
#: name -> (dtype, summary_mode, training step, planted fault)
STATS_CASES = {
    "fp32-train": ("float32", "statistics", True, False),
    "bf16-train": ("bfloat16", "statistics", True, False),
    "bf16-fault-train": ("bfloat16", "statistics", True, True),
    "fp32-md5": ("float32", "md5", False, False),
    "bf16-md5": ("bfloat16", "md5", False, False),
    "fp32-xor": ("float32", "xor", False, False),
    "fp32-xor-again": ("float32", "xor", False, False),
    "bf16-xor": ("bfloat16", "xor", False, False),
}


#: real decoders (scripts/get_real_models.py) dumped the same way, forward only, fp32 and bf16
REAL_CASES = {f"{m}-{d}": (m, d) for m in ("smollm2-135m", "gemma3-270m")
              for d in ("float32", "bfloat16")}


def write_statistics(name: str) -> None:
    """One statistics dump of :data:`STATS_CASES` or :data:`REAL_CASES` (msprobe's debugger
    is one per process: each case runs in a process of its own, see :func:`main`)."""
    import torch
    from msprobe.pytorch import PrecisionDebugger
    from transformers import AutoModelForCausalLM

    if name in REAL_CASES:
        from get_real_models import default_dest

        model_dir, dtype = default_dest() / REAL_CASES[name][0], REAL_CASES[name][1]
        mode, train, fault = "statistics", False, False
    else:
        model_dir = FIXTURE
        dtype, mode, train, fault = STATS_CASES[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                 dtype=getattr(torch, dtype))
    model.train(train)
    if fault:  # one output channel of layer 1's MLP down projection eight times too large
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[7] *= 8
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])
    if name in REAL_CASES:  # a sentence through the model's own tokenizer
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(model_dir)(
            "The capital of France is Paris, and the capital of Germany is",
            return_tensors="pt").input_ids
    out = STATS_OUT / name
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({
            "task": "statistics", "dump_path": str(Path(tmp) / "dump"), "rank": [],
            "step": [], "level": "L0",
            "statistics": {"scope": [], "list": [], "data_mode": ["all"],
                           "summary_mode": mode}}))
        debugger = PrecisionDebugger(config_path=str(config))
        for _ in range(2 if train else 1):
            debugger.start(model)
            if train:
                model(input_ids=ids, labels=ids).loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=ids)
            debugger.stop()
            debugger.step()
        for found in sorted((Path(tmp) / "dump").rglob("dump.json")):
            keep_dump(found, out / found.parent.parent.name / "proc0")  # step<s>/proc0
    report_size(out)


def keep_dump(found: Path, dest: Path) -> None:
    """msprobe's ``dump.json`` (compact, its absolute ``dump_data_dir`` dropped) and
    ``construct.json`` copied into ``dest``."""
    dest.mkdir(parents=True)
    doc = json.loads(found.read_text())
    doc["dump_data_dir"] = None
    (dest / "dump.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    shutil.copy(found.parent / "construct.json", dest / "construct.json")


def report_size(out: Path) -> None:
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out.relative_to(ROOT)}: {size / 1e3:.0f} kB")


#: two ranks under torchrun (gloo), DistributedDataParallel, one training step: name -> dtype
RANK_CASES = {"ddp2-fp32": "float32", "ddp2-bf16": "bfloat16"}


def write_ranks(name: str) -> None:
    """One :data:`RANK_CASES` dump, from inside a ``torchrun --nproc_per_node 2`` worker:
    each rank trains the DDP-wrapped fixture on its half of the batch, and msprobe writes
    ``step0/rank<r>/`` (its records named under DDP's ``module.``)."""
    import torch
    import torch.distributed as dist
    from msprobe.pytorch import PrecisionDebugger
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(FIXTURE, attn_implementation="eager",
                                                 dtype=getattr(torch, RANK_CASES[name]))
    ddp = DistributedDataParallel(model.train())
    batch = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64], [128, 11, 300, 2, 9, 81, 33, 6]])
    ids = batch[rank:rank + 1]
    dump = Path(sys.argv[3])
    config = dump.parent / f"config-{rank}.json"
    config.write_text(json.dumps({
        "task": "statistics", "dump_path": str(dump), "rank": [], "step": [0],
        "level": "L0", "statistics": {"scope": [], "list": [], "data_mode": ["all"],
                                      "summary_mode": "statistics"}}))
    debugger = PrecisionDebugger(config_path=str(config))
    debugger.start(ddp)
    ddp(input_ids=ids, labels=ids).loss.backward()
    debugger.stop()
    debugger.step()
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(name: str) -> None:
    """Run :func:`write_ranks` under torchrun and keep msprobe's ``step0/rank<r>/``."""
    import subprocess

    out = STATS_OUT / name
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "dump"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29533", __file__, "--rank-worker", name, str(dump)],
                       check=True)
        for found in sorted(dump.rglob("dump.json")):  # step0/rank<r>
            keep_dump(found, out / found.parent.parent.name / found.parent.name)
    report_size(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ranks"]:
        for case in sys.argv[2:] or list(RANK_CASES):
            run_ranks(case)
    elif sys.argv[1:2] == ["--rank-worker"]:
        write_ranks(sys.argv[2])
    elif sys.argv[1:2] == ["--statistics"]:
        import subprocess

        for case in sys.argv[2:] or list(STATS_CASES) + list(REAL_CASES):
            subprocess.run([sys.executable, __file__, "--one", case], check=True)
    elif sys.argv[1:2] == ["--one"]:
        write_statistics(sys.argv[2])
    elif sys.argv[1:]:  # --help, or anything else: the usage, and nothing rewritten
        print(__doc__)
        sys.exit(0 if sys.argv[1] in ("-h", "--help") else 2)
    else:
        main()

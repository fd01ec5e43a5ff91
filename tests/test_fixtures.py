"""The bundled fixtures: rebuilt by scripts/make_fixtures.py, loaded quietly.

A rebuild on another CPU or with another transformers release is the same model, not the same
bytes: seeded weights are drawn by the CPU's vectorised kernels (``ATEN_CPU_CAPABILITY=default``
draws them a few fp32 ulps apart from avx2/avx512), and each ``config.json`` names the
transformers release that wrote it. So what must be equal is compared exactly (every file's
presence, the tokenizers, the configs but their ``transformers_version``, the weights' names,
shapes and dtypes) and the weights' values within ``WEIGHT_ULPS`` fp32 ulps of each tensor's
largest value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from .conftest import FIXTURES, ROOT

#: how far a rebuild's weights may be from the committed ones, in fp32 ulps of a tensor's
#: largest magnitude (measured: 4.3 ulps at ATEN_CPU_CAPABILITY=default, 0 at avx2/avx512)
WEIGHT_ULPS = 64
#: config fields that name the software that wrote a file, not the model
WRITER_FIELDS = ("transformers_version",)


def differences(built: Path, committed: Path) -> list[str]:
    """What differs between two fixture trees beyond what a CPU or a release may change."""
    found = []
    names = {str(p.relative_to(r)) for r in (built, committed)
             for p in r.glob("tiny-*/*") if p.is_file()}
    for name in sorted(names):
        a, b = built / name, committed / name
        if not (a.is_file() and b.is_file()):
            found.append(f"{name}: only in {'the rebuild' if a.is_file() else 'fixtures/'}")
        elif name.endswith(".safetensors"):
            found += [f"{name}: {d}" for d in _weight_differences(load_file(a), load_file(b))]
        elif name.endswith(".json") and "config" in Path(name).name:
            ja, jb = (json.loads(p.read_text()) for p in (a, b))
            for field in WRITER_FIELDS:
                ja.pop(field, None)
                jb.pop(field, None)
            if ja != jb:
                keys = sorted(k for k in ja.keys() | jb.keys() if ja.get(k) != jb.get(k))
                found.append(f"{name}: {keys}")
        elif a.read_bytes() != b.read_bytes():
            found.append(f"{name}: bytes differ")
    return found


def _weight_differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    if a.keys() != b.keys():
        return [f"tensors {sorted(a.keys() ^ b.keys())} in one file only"]
    out = []
    for key in sorted(a):
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append(f"{key}: {x.dtype}{list(x.shape)} against {y.dtype}{list(y.shape)}")
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        scale = float(np.abs(y64).max()) if y64.size else 0.0
        ulps = float(np.abs(x64 - y64).max()) / (scale * 2.0**-23) if scale else 0.0
        if not ulps <= WEIGHT_ULPS:
            out.append(f"{key}: {ulps:.3g} fp32 ulps of max|w| apart (> {WEIGHT_ULPS})")
    return out


@pytest.mark.slow
def test_fixtures_rebuild_to_the_same_models(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fixtures.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = differences(tmp_path, FIXTURES)
    assert not found, "fixtures/ differ from a rebuild (scripts/make_fixtures.py): " + \
        "; ".join(found[:5])


def test_fixture_comparison_sees_what_matters(tmp_path: Path) -> None:
    """The tolerant comparison still fails a changed weight, shape, config value or token."""
    import shutil

    one, committed = tmp_path / "one", tmp_path / "committed"
    for root in (one, committed):
        shutil.copytree(FIXTURES / "tiny-qwen3", root / "tiny-qwen3")
    assert differences(one, committed) == []
    weights = load_file(one / "tiny-qwen3" / "model.safetensors")
    nudged = dict(weights)
    key = sorted(weights)[1]
    w = weights[key].copy()
    w.reshape(-1)[0] += 256 * np.abs(w).max() * 2.0**-23
    nudged[key] = w
    assert any(key in d for d in _weight_differences(nudged, weights))
    tiny = dict(weights)
    w = weights[key].copy()
    w.reshape(-1)[0] += 4 * np.abs(w).max() * 2.0**-23
    tiny[key] = w
    assert _weight_differences(tiny, weights) == []
    config = json.loads((one / "tiny-qwen3" / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (one / "tiny-qwen3" / "config.json").write_text(json.dumps(config))
    assert differences(one, committed) == []
    config["num_hidden_layers"] += 1
    (one / "tiny-qwen3" / "config.json").write_text(json.dumps(config))
    assert differences(one, committed) == ["tiny-qwen3/config.json: ['num_hidden_layers']"]
    (one / "tiny-qwen3" / "tokenizer.json").write_text("{}")
    assert "tiny-qwen3/tokenizer.json: bytes differ" in differences(one, committed)
    (committed / "tiny-qwen3" / "generation_config.json").unlink()
    assert "tiny-qwen3/generation_config.json: only in the rebuild" in differences(one, committed)


def test_t5_fixtures_load_without_transformers_warnings() -> None:
    """No "tie shared.weight to lm_head.weight ... different values" on every load."""
    code = ("import transformers\n"
            "transformers.logging.set_verbosity_warning()\n"
            "transformers.utils.logging.disable_progress_bar()\n"
            "from transformers import AutoModelForSeq2SeqLM\n"
            f"for d in ({str(FIXTURES / 'tiny-flan-t5')!r}, "
            f"{str(FIXTURES / 'tiny-flan-t5-overflow')!r}):\n"
            "    m = AutoModelForSeq2SeqLM.from_pretrained(d)\n"
            "    assert m.lm_head.weight is m.shared.weight\n"
            "    assert not m.config.scale_decoder_outputs\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == "", proc.stderr


def test_decoder_fixtures_load_without_transformers_warnings() -> None:
    code = ("import transformers\n"
            "transformers.logging.set_verbosity_warning()\n"
            "transformers.utils.logging.disable_progress_bar()\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"for d in ({str(FIXTURES / 'tiny-qwen3')!r}, "
            f"{str(FIXTURES / 'tiny-llama-overflow')!r}, "
            f"{str(FIXTURES / 'tiny-qwen3.5')!r}):\n"
            "    AutoModelForCausalLM.from_pretrained(d)\n"
            "    AutoTokenizer.from_pretrained(d)\n"
            "from transformers import AutoModelForImageTextToText as VL\n"
            f"vl = {str(FIXTURES / 'tiny-qwen3.5-vl')!r}\n"
            "assert type(VL.from_pretrained(vl)).__name__ == 'Qwen3_5ForConditionalGeneration'\n"
            "AutoTokenizer.from_pretrained(vl)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == proc.stderr.strip() == "", proc.stderr

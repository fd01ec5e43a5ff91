"""precision.keep_fp32 on any module (issue 19): decoder layers, attention and MLP blocks,
norms, embeddings, lm_head, ModuleList members, whole stacks; outputs handed back in the
compute dtype or handed on in fp32; caches kept in the compute dtype; and the decoder whose
residual stream overflows fp16 (fixtures/tiny-llama-overflow), fixed by an fp32 residual."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import precision
from precision.cli import main
from precision.runtime.models.keep import kept_modules

from .conftest import FIXTURES, QWEN, T5, T5_OVERFLOW

LLAMA_OVERFLOW = FIXTURES / "tiny-llama-overflow"


# ------------------------------------------------------------------ helpers


def _tensors(value: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` with where it sits (caches and other objects left out)."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, (tuple, list)):
        return [t for i, v in enumerate(value) for t in _tensors(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _tensors(v, f"{path}.{k}")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [t for f in dataclasses.fields(value)
                for t in _tensors(getattr(value, f.name), f"{path}.{f.name}")]
    return []


class Calls:
    """Each call of one kept module: its inputs as it computes on them (after the upcast),
    its raw output (before it is handed on) and the output handed on."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),  # after keep's
            module.register_forward_hook(self._raw, with_kwargs=True, prepend=True),
            module.register_forward_hook(self._out, with_kwargs=True),
        ]
        self.recording = True

    def _pre(self, _m: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if self.recording:
            self.calls.append({"in": copy.deepcopy((args, kwargs))})

    def _raw(self, _m: torch.nn.Module, _a: Any, _k: Any, out: Any) -> None:
        if self.recording:
            self.calls[-1]["raw"] = [(p, t.detach().clone()) for p, t in _tensors(out)]

    def _out(self, _m: torch.nn.Module, _a: Any, _k: Any, out: Any) -> None:
        if self.recording:
            self.calls[-1]["out"] = [(p, t.dtype) for p, t in _tensors(out)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _cache_dtypes(cache: Any) -> set[torch.dtype]:
    out: set[torch.dtype] = set()
    for sub in (getattr(cache, "self_attention_cache", None),
                getattr(cache, "cross_attention_cache", None)):
        if sub is not None:
            out |= _cache_dtypes(sub)
    for layer in getattr(cache, "layers", None) or []:
        out |= {v.dtype for v in vars(layer).values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return out


def _check(model: torch.nn.Module, pattern: str, name: str,
           forward: Callable[[torch.nn.Module], Any],
           generate: Callable[[torch.nn.Module], Any],
           loss: Callable[[torch.nn.Module], torch.Tensor]) -> list[str]:
    """Keep ``pattern`` in fp32 on the fp16 ``model``; check module ``name`` (one it keeps):
    forward, generate and a backward step run, its outputs match an fp32 copy of it on the
    same (upcast) inputs, what it hands on has the promised dtype, caches stay fp16."""
    reference = copy.deepcopy(model.get_submodule(name)).float()  # before any hook
    kept = precision.keep_fp32(model, [pattern])
    assert name in kept
    hand_on = kept_modules(model)[name]
    calls = Calls(model.get_submodule(name))
    with torch.no_grad():
        out = forward(model)
        assert torch.isfinite(out.logits).all()
        logits_fp32 = kept_modules(model).get("lm_head") == "fp32"
        assert out.logits.dtype == (torch.float32 if logits_fp32 else torch.float16)
        gen = generate(model)
    cache = gen.past_key_values
    if cache is not None:
        assert _cache_dtypes(cache) == {torch.float16}, _cache_dtypes(cache)
    assert calls.calls and len(calls.calls) >= 2  # the forward and the generation steps
    for call in calls.calls:
        args, kwargs = call["in"]
        assert not any(t.dtype == torch.float16 for _, t in _tensors((args, kwargs)))
        with torch.no_grad():
            expected = _tensors(reference(*args, **kwargs))
        assert [p for p, _ in expected] == [p for p, _ in call["raw"]]
        for (path, want), (_, got) in zip(expected, call["raw"], strict=True):
            # the same fp32 kernels on the same inputs and weights: equal to the bit
            assert got.dtype == want.dtype and torch.equal(got, want), f"{name}{path}"
        handed = dict(call["out"])
        floats = [p for p, t in call["raw"] if t.dtype == torch.float32]
        if hand_on == "compute":
            assert all(handed[p] == torch.float16 for p in floats), handed
        else:  # the main output goes on in fp32, the rest in fp16
            assert handed[floats[0]] == torch.float32
            assert all(handed[p] == torch.float16 for p in floats[1:]), handed
    calls.remove()
    model.zero_grad()
    value = loss(model)
    value.backward()
    assert torch.isfinite(value)
    kept_grads = [p.grad for p in model.get_submodule(name).parameters()]
    assert kept_grads and all(g is not None and g.dtype == torch.float32
                              and torch.isfinite(g).all() for g in kept_grads)
    assert any(p.grad is not None and p.grad.dtype == torch.float16
               for p in model.parameters())
    return kept


# ------------------------------------------------------------------ the decoder (Qwen3)

IDS = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


def _qwen() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(QWEN).half().eval()


def _q_forward(m: torch.nn.Module) -> Any:
    return m(input_ids=IDS, attention_mask=MASK)


def _q_generate(m: torch.nn.Module) -> Any:
    return m.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False,
                      return_dict_in_generate=True, pad_token_id=0)


def _q_loss(m: torch.nn.Module) -> torch.Tensor:
    ids = IDS[:1]
    return m(input_ids=ids, labels=ids, use_cache=False).loss


QWEN_KINDS = {  # pattern -> the kept module checked
    "model.layers.1": "model.layers.1",  # a whole decoder layer (residual adds inside)
    "model.layers.1.self_attn": "model.layers.1.self_attn",  # keyword tensors, tuple, cache
    "model.layers.1.mlp": "model.layers.1.mlp",
    "model.layers.1.input_layernorm": "model.layers.1.input_layernorm",
    "model.norm": "model.norm",
    "model.embed_tokens": "model.embed_tokens",  # integer inputs
    "lm_head": "lm_head",
    "model.layers.*": "model.layers.2",  # members of a ModuleList
    "model": "model",  # a whole stack: ModelOutput with a cache it made itself
}


@pytest.mark.parametrize("hand_on", ["", ":fp32"])
@pytest.mark.parametrize("pattern", list(QWEN_KINDS))
def test_keep_any_decoder_module(pattern: str, hand_on: str) -> None:
    model = _qwen()
    kept = _check(model, pattern + hand_on, QWEN_KINDS[pattern], _q_forward, _q_generate,
                  _q_loss)
    assert set(kept_modules(model).values()) == {"fp32" if hand_on else "compute"}
    if pattern == "model.layers.*":
        assert kept == [f"model.layers.{i}" for i in range(4)]


def test_the_crash_it_fixes() -> None:
    """A kept decoder layer's fp32 output used to flow into fp16 Linears: 'expected m1 and
    m2 to have the same dtype'."""
    model = _qwen()
    precision.keep_fp32(model, ["model.layers.1"])
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK)
    assert torch.isfinite(out.logits).all()


def test_fp32_residual_stream_with_fp16_compute() -> None:
    """``:fp32`` on one layer: the layers after it get an fp32 residual stream and still
    compute in fp16 (their Linears get fp16 inputs, their norms hand fp16 on)."""
    model = _qwen()
    precision.keep_fp32(model, ["model.layers.1:fp32"])
    seen: dict[str, torch.dtype] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, i, o, n=n: seen.update({n + ":in": i[0].dtype, n: o.dtype}))
        for n in ("model.layers.2", "model.layers.3.mlp.down_proj",
                  "model.layers.3.post_attention_layernorm", "model.norm", "lm_head")]
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
    for h in hooks:
        h.remove()
    assert seen["model.layers.2:in"] == seen["model.layers.2"] == torch.float32  # residual
    assert seen["model.layers.3.mlp.down_proj:in"] == torch.float16  # compute
    assert seen["model.layers.3.post_attention_layernorm:in"] == torch.float32
    assert seen["model.layers.3.post_attention_layernorm"] == torch.float16
    assert seen["model.norm"] == seen["lm_head"] == torch.float16
    assert model.get_submodule("model.layers.2.mlp.down_proj").weight.dtype == torch.float16


# ------------------------------------------------------------------ the encoder-decoder (T5)

T5_IDS = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])
T5_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _t5(path: Path = T5) -> torch.nn.Module:
    return AutoModelForSeq2SeqLM.from_pretrained(path).half().eval()


def _t_forward(m: torch.nn.Module) -> Any:
    return m(input_ids=T5_IDS, attention_mask=T5_MASK,
             decoder_input_ids=torch.tensor([[0, 5, 6], [0, 7, 8]]))


def _t_generate(m: torch.nn.Module) -> Any:
    return m.generate(input_ids=T5_IDS, attention_mask=T5_MASK, max_new_tokens=3,
                      do_sample=False, return_dict_in_generate=True)


def _t_loss(m: torch.nn.Module) -> torch.Tensor:
    return m(input_ids=T5_IDS[:1], labels=torch.tensor([[5, 6, 1]]), use_cache=False).loss


T5_KINDS = {  # pattern -> the kept module checked
    "encoder.block.1": "encoder.block.1",  # a tuple (hidden states, position bias)
    "decoder.block.1": "decoder.block.1",
    "decoder.block.1.layer.0.SelfAttention": "decoder.block.1.layer.0.SelfAttention",
    "decoder.block.1.layer.1.EncDecAttention": "decoder.block.1.layer.1.EncDecAttention",
    "encoder.block.1.layer.1.DenseReluDense": "encoder.block.1.layer.1.DenseReluDense",
    "encoder.final_layer_norm": "encoder.final_layer_norm",
    "shared": "decoder.embed_tokens",  # an embedding tied to the stacks' and to lm_head
    "decoder.block.*": "decoder.block.2",
    "encoder": "encoder",  # a ModelOutput
    "*.DenseReluDense.wo": "decoder.block.1.layer.2.DenseReluDense.wo",
}


@pytest.mark.parametrize("hand_on", ["", ":fp32"])
@pytest.mark.parametrize("pattern", list(T5_KINDS))
def test_keep_any_t5_module(pattern: str, hand_on: str) -> None:
    model = _t5()
    kept = _check(model, pattern + hand_on, T5_KINDS[pattern], _t_forward, _t_generate,
                  _t_loss)
    if pattern == "shared":  # the modules sharing its weight hold fp32 weights too
        assert kept == ["shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"]
    auto = "fp32" if pattern.endswith(".wo") else "compute"  # as transformers hands wo on
    assert set(kept_modules(model).values()) == {"fp32" if hand_on else auto}


def test_t5_overflow_fixed_by_wo_as_transformers_does() -> None:
    """T5's wo (``_keep_in_fp32_modules``) hands fp32 on by default: the residual after it
    holds 2e5 in fp32, so the planted overflow is gone; ``:compute`` brings it back."""
    for suffix, finite in (("", True), (":compute", False)):
        model = _t5(T5_OVERFLOW)
        precision.keep_fp32(model, ["*.DenseReluDense.wo" + suffix])
        seen: list[torch.Tensor] = []
        wo = model.get_submodule("encoder.block.2.layer.1.DenseReluDense.wo")
        wo.register_forward_hook(lambda _m, _i, o, seen=seen: seen.append(o))
        with torch.no_grad():
            out = _t_forward(model)
        assert torch.isfinite(out.logits).all()  # (T5's clamp hides an inf from the logits)
        assert bool(torch.isfinite(seen[0]).all()) is finite


# ------------------------------------------------------------------ API details


@dataclasses.dataclass
class Pair:
    main: torch.Tensor
    side: torch.Tensor
    count: int = 0


class Toy(torch.nn.Module):
    """Positional and keyword tensors in, a plain dataclass out."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, extra: dict[str, torch.Tensor],
                ids: torch.Tensor) -> Pair:
        assert x.dtype == extra["y"].dtype == torch.float32 and ids.dtype == torch.long
        return Pair(self.lin(x) + extra["y"], x * 2, int(ids.sum()))


class Host(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.toy = Toy()
        self.after = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = self.toy(x, extra={"y": x}, ids=torch.tensor([1, 2]))
        return self.after(self.norm(pair.main * 1000)) + pair.side


@pytest.mark.parametrize("hand_on", ["compute", "fp32"])
def test_dataclass_outputs_and_keyword_inputs(hand_on: str) -> None:
    torch.manual_seed(0)
    host = Host().half()
    seen: list[Pair] = []
    precision.keep_fp32(host, "toy", hand_on=hand_on)
    host.toy.register_forward_hook(lambda _m, _i, o: seen.append(o))
    out = host(torch.randn(3, 4).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert seen[0].count == 3 and seen[0].side.dtype == torch.float16
    assert seen[0].main.dtype == (torch.float32 if hand_on == "fp32" else torch.float16)


def test_patterns_and_errors() -> None:
    model = _qwen()
    with pytest.raises(precision.InputError, match="after ':'"):
        precision.keep_fp32(model, ["model.layers.1:fp64"])
    with pytest.raises(precision.InputError, match="hand_on"):
        precision.keep_fp32(model, ["model.layers.1"], hand_on="bf16")
    with pytest.raises(precision.InputError, match="matches no module"):
        precision.keep_fp32(model, ["model.nothing"])
    assert precision.keep_fp32(model, ["model.layers.1"], hand_on="fp32") == ["model.layers.1"]
    # a second call adds modules, skips what is inside a kept one, changes a hand-on
    assert precision.keep_fp32(model, ["model.layers.1.mlp", "lm_head"]) == ["lm_head"]
    precision.keep_fp32(model, ["model.layers.1:compute"])
    assert kept_modules(model) == {"model.layers.1": "compute", "lm_head": "compute"}
    with torch.no_grad():
        assert torch.isfinite(_q_forward(model).logits).all()


# ------------------------------------------------------------------ a residual stream beyond fp16

K = 4  # the first decoder layer of tiny-llama-overflow whose output exceeds 65504


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("llama") / "b.st"
    code, out = _cli("capture", "--model", str(LLAMA_OVERFLOW), "--dtype", "fp32", "-q",
                     "-o", str(base))
    assert code == 0, out
    return base


def _capture_compare(base: Path, tmp: Path, dtype: str, *keep: str) -> tuple[int, dict[str, Any]]:
    target = tmp / "t.st"
    flags = [a for k in keep for a in ("--keep-fp32", k)]
    code, out = _cli("capture", "--model", str(LLAMA_OVERFLOW), "--dtype", dtype, *flags,
                     "--replay", str(base), "-q", "--force", "-o", str(target))
    assert code == 0, out
    code, out = _cli("compare", str(base), str(target), "--json", str(tmp / "c.json"))
    return code, json.loads((tmp / "c.json").read_text())


def test_llama_overflow_fixture_overflows_in_the_residual_add(llama_base: Path) -> None:
    """fp32: layer outputs pass 65504 from layer K on, no submodule comes near it."""
    dump = precision.load(llama_base)
    layer_max = [float(abs(dump[f"model.layers.{i}:out"]).max()) for i in range(8)]
    assert all(m < 65504 for m in layer_max[:K]) and all(m > 65504 for m in layer_max[K:])
    assert layer_max == sorted(layer_max)  # the residual stream grows with depth
    subs = [k for k in list(dump.keys()) if k.startswith("model.layers.") and k.count(".") > 2
            and k.endswith(":out")]
    assert subs and max(float(abs(dump[k]).max()) for k in subs) < 30000


def test_llama_overflow_in_fp16_is_found_at_the_layer_output(llama_base: Path,
                                                              tmp_path: Path) -> None:
    code, report = _capture_compare(llama_base, tmp_path, "fp16", "none")
    assert code == 1 and report["first_divergence"] == f"model.layers.{K}:out"
    first = next(r for r in report["rows"] if r["key"] == f"model.layers.{K}:out")
    assert first["status"] == "OVERFLOW"
    assert not any(r["status"] != "OK" for r in report["rows"]
                   if r["key"].startswith(f"model.layers.{K}.")), "a submodule is flagged"


def test_llama_overflow_bf16_is_clean(llama_base: Path, tmp_path: Path) -> None:
    code, report = _capture_compare(llama_base, tmp_path, "bf16")
    assert code == 0 and report["passed"], report["summary"]


@pytest.mark.parametrize("keep", [
    "model.layers.*:fp32",  # the decoder layers in fp32, handing the residual on in fp32
    "model.embed_tokens:fp32",  # the residual stream in fp32 from the start, fp16 compute
    f"model.layers.{K - 1}:fp32",  # fp32 from the layer before the overflow on
])
def test_llama_overflow_fixed_by_an_fp32_residual_stream(llama_base: Path, tmp_path: Path,
                                                         keep: str) -> None:
    code, report = _capture_compare(llama_base, tmp_path, "fp16", "none", keep)
    assert code == 0 and report["passed"], report["summary"]
    assert report["counts"]["OVERFLOW"] == report["counts"]["NAN"] == 0


def test_llama_overflow_not_fixed_by_layers_handing_back_fp16(llama_base: Path,
                                                              tmp_path: Path) -> None:
    """Layers computing in fp32 but handing their output back in fp16 overflow all the same:
    the residual stream itself needs fp32's range."""
    code, report = _capture_compare(llama_base, tmp_path, "fp16", "none", "model.layers.*")
    assert code == 1 and report["first_divergence"] == f"model.layers.{K}:out"
    assert report["counts"]["OVERFLOW"] >= 1


def test_a_python_capture_of_a_fixed_fp16_model_is_judged_as_fp16(llama_base: Path,
                                                                  tmp_path: Path) -> None:
    """The notebook's fix from Python: the model in fp16 with its layers kept in fp32
    (most records fp32) is an fp16 run, recorded as such, and the fix passes against the
    fp32 baseline; the model in fp16 without the fix fails, and an fp32 model records no
    dtype of its own (its records say fp32)."""
    base = precision.load(llama_base)
    feed = {k.removeprefix("input:"): torch.from_numpy(base[k]) for k in base.tensors
            if k.startswith("input:")}
    model = AutoModelForCausalLM.from_pretrained(LLAMA_OVERFLOW, dtype=torch.float32).eval()
    with torch.no_grad(), precision.capture(model, tmp_path / "fp32.st") as fp32:
        model(**feed)
    assert "dtype" not in fp32.dump.meta
    model.half()
    with torch.no_grad(), precision.capture(model, tmp_path / "fp16.st"):
        model(**feed)
    precision.keep_fp32(model, ["model.layers.*:fp32"])
    with torch.no_grad(), precision.capture(model, tmp_path / "fixed.st") as fixed:
        model(**feed)
    assert fixed.dump.meta["dtype"] == "float16"
    assert fixed.dump.meta["module_dtypes"]["model.layers.0.mlp.down_proj"] == "float32"
    broken = precision.compare(llama_base, tmp_path / "fp16.st")
    assert not broken and "[fp32->fp16]" in broken.summary
    report = precision.compare(llama_base, tmp_path / "fixed.st")
    assert report and "[fp32->fp16]" in report.summary, report.summary


def test_a_model_cast_after_keep_fp32_is_one_line_naming_the_order() -> None:
    """keep_fp32 then .half() turns the kept weights to fp16 again; the forward says to call
    keep_fp32 after the cast (it was torch's 'mat1 and mat2 must have the same dtype')."""
    from precision.errors import InputError

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    assert precision.keep_fp32(model, ["0"]) == ["0"]
    model.half()
    with pytest.raises(InputError, match=r"^0 was kept in fp32 by keep_fp32, but the model "
                                         r"was cast after that \(its weights are float16\): "
                                         r"call precision.keep_fp32 after model.half\(\)"):
        model(torch.randn(2, 4).half())
    right = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    right.half()
    precision.keep_fp32(right, ["0"])
    assert right(torch.randn(2, 4).half()).dtype == torch.float16


def test_a_policy_given_as_one_string_is_one_value() -> None:
    """precision.isolate(..., keep_fp32="none") failed: 'keep_fp32 n o n e matches no module'."""
    from precision.runtime.models.load import Policy

    assert Policy.parse("none") == Policy.parse(["none"]) == Policy("none", ())
    assert Policy.parse("auto") == Policy("auto", ())
    assert Policy.parse("*.wo") == Policy.parse(["*.wo"]) == Policy("none", ("*.wo",))


def test_a_glob_alone_says_it_starts_from_none(tmp_path: Path) -> None:
    """--keep-fp32 GLOB alone switches the rest from auto to none (T5's wo is cast to fp16
    then); --help says so, and so does the capture's log."""

    said = "--keep-fp32 lm_head: the other modules are cast to fp16, as with none"
    for extra, says in (((), True), (("--keep-fp32", "auto"), False)):
        result = CliRunner().invoke(main, ["capture", "--model", str(T5_OVERFLOW), "--dtype",
                                           "fp16", "--keep-fp32", "lm_head", *extra, "-o",
                                           str(tmp_path / f"x{len(extra)}.st")])
        assert result.exit_code == 0 and (said in result.stderr) == says, result.stderr

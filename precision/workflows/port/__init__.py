"""``precision port``: one command from a model to a signed-off port report.

Stages, each resumable (:mod:`.stages`), each calling the API the single commands call:

1. ``baseline``: the model in fp32 on the CPU (``baseline_device``), with its same-precision
   reference in the target's dtype (``capture --expect``);
2. ``target``: the model on ``device`` in ``dtype``, replaying the baseline's inputs;
3. ``compare``: layer by layer, with logits and generations (:func:`precision.compare`), and
   its per-layer HTML report;
4. ``consistency``: the target run ``repeat`` times in all (the target's own run first),
   compared bitwise (:func:`precision.judge.consistency.consistency_of`);
5. only when the comparison is flagged: ``scan`` (headroom of the target run with module
   inputs), ``isolate`` (local versus inherited error), ``suggest`` (a keep-fp32 policy,
   verified) and ``fix``: the target once more with that policy, on the baseline's inputs,
   compared again;
6. ``report.html``, ``port.json`` and ``PORT.md`` in the port folder, next to the dumps.

With ``engine="vllm"`` the target runs in a vLLM engine first and the Hugging Face fp32
baseline replays its tokens (docs/vllm.md); there is no keep-fp32 fix search for an engine.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ...dtypes import canonical, short
from ...dumps import load, reference_path
from ...dumps.atomic import write_output
from ...errors import InputError, given, option
from ...judge.compare import compare
from ...judge.consistency import consistency_of
from . import evidence
from .result import Check, PortResult
from .stages import Log, Outcome, StageError, Stages, file_digest

__all__ = ["PortOptions", "PortResult", "StageError", "port"]

#: the dumps and reports in a port folder
BASE, TARGET, FIXED, SCAN = "base.st", "target.st", "fixed.st", "scan.st"
COMPARE_HTML, FIXED_HTML = "compare.html", "fixed-compare.html"


def _quiet(_msg: str) -> None:
    """Discard progress lines."""


@dataclass(frozen=True)
class PortOptions:
    """What ``precision port`` takes (see its ``--help``)."""

    model: str
    output: str = "port"
    device: str = "cpu"
    dtype: str = "fp16"
    baseline_device: str = "cpu"
    engine: str = "hf"
    engine_args: Sequence[str] = ()
    prompts: Sequence[str] = ()
    prompts_file: str | None = None
    images: Sequence[str] = ()
    audio: Sequence[str] = ()
    feed: str | None = None
    mode: str = "full"
    backward: bool = False
    max_new_tokens: int = 8
    keep_fp32: Sequence[str] = ("auto",)
    repeat: int = 3
    budget: int = 8
    force: bool = False
    log: Log = field(default=_quiet, compare=False, repr=False)

    def __post_init__(self) -> None:
        """Each list of strings as a tuple; one string given alone (``keep_fp32="none"``
        from Python) is a list of one, not of its letters."""
        for name in ("engine_args", "prompts", "images", "audio", "keep_fp32"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def inputs(self) -> dict[str, Any]:
        """What the baseline's inputs depend on (file contents by their digest)."""
        return {"prompts": list(self.prompts), "prompts_file": file_digest(self.prompts_file),
                "images": [file_digest(i) for i in self.images],
                "audio": [file_digest(a) for a in self.audio], "feed": file_digest(self.feed),
                "mode": self.mode, "backward": self.backward,
                "max_new_tokens": self.max_new_tokens}


def port(model: str, *, output: str = "port", log: Log = _quiet, **options: Any) -> PortResult:
    """Run every stage of a port of ``model`` (see the module doc); returns its result and
    writes ``report.html``, ``port.json`` and ``PORT.md`` in ``output``. Raises
    :class:`StageError` naming the stage that failed (the stages before it are kept)."""
    return run_port(PortOptions(model=model, output=output, log=log, **options))


def run_port(opts: PortOptions) -> PortResult:
    """:func:`port` on options already gathered (the command's way in)."""
    from ...runtime import devices
    from ...runtime.run.runner import CaptureOptions, run_capture

    _check(opts)
    folder = Path(opts.output)
    target_dtype = short(canonical(opts.dtype))
    if opts.engine == "hf":  # an unavailable device is one line, before any stage runs
        devices.resolve(opts.device, canonical(opts.dtype))
    else:
        from ...engines.vllm.launch import require_vllm

        require_vllm()
    devices.resolve(opts.baseline_device, "float32")
    model_id = _fingerprint(opts.model)
    folder.mkdir(parents=True, exist_ok=True)
    stages = Stages(folder, force=opts.force, log=opts.log)
    expect = (target_dtype,) if target_dtype != "fp32" else ()
    capture = CaptureOptions(model=opts.model, output="", prompts=opts.prompts,
                             prompts_file=opts.prompts_file, images=opts.images,
                             audio=opts.audio, feed=opts.feed, mode=opts.mode,
                             full_logits=True, backward=opts.backward,
                             max_new_tokens=opts.max_new_tokens, force=True)
    target_opts = replace(capture, device=opts.device, dtype=opts.dtype,
                          keep_fp32=tuple(opts.keep_fp32), replay=str(folder / BASE),
                          images=(), audio=(), feed=None)  # the baseline's inputs, replayed
    common = {"model": model_id, "libraries": _libraries(), **opts.inputs()}
    baseline_in = {**common, "device": opts.baseline_device, "expect": list(expect)}
    target_in = {**common, "device": opts.device, "dtype": target_dtype,
                 "keep_fp32": list(opts.keep_fp32), "engine": opts.engine,
                 "engine_args": list(opts.engine_args)}

    def baseline() -> Outcome:
        replay = str(folder / TARGET) if opts.engine == "vllm" else None
        path = run_capture(replace(capture, output=str(folder / BASE), device=opts.baseline_device,
                                   dtype="fp32", expect=expect, replay=replay), _quiet)
        refs = [reference_path(path, e).name for e in expect]
        return {**_dump_facts(path), "references": list(expect), "files": [BASE, *refs]}

    def target() -> Outcome:
        if opts.engine == "vllm":
            _vllm_capture(opts, folder / TARGET)
            return {**_dump_facts(folder / TARGET), "files": [TARGET]}
        path = run_capture(replace(target_opts, output=str(folder / TARGET)), _quiet)
        return {**_dump_facts(path), "files": [TARGET]}

    where = f"{opts.device}, {target_dtype}" + (", vLLM" if opts.engine == "vllm" else "")
    base_title = f"{opts.baseline_device}, fp32" + (f" and its {expect[0]} reference"
                                                    if expect else "")
    if opts.engine == "vllm":  # the engine's run first: the baseline replays its tokens
        outcomes = {"target": stages.run("target", where, target_in, target)}
        outcomes["baseline"] = stages.run("baseline", base_title + ", replaying vLLM's tokens",
                                          baseline_in, baseline, after=("target",))
        order: tuple[str, ...] = ("baseline",)
    else:
        outcomes = {"baseline": stages.run("baseline", base_title, baseline_in, baseline)}
        outcomes["target"] = stages.run("target", where, target_in, target,
                                        after=("baseline",))
        order = ("target",)
    outcomes["compare"] = stages.run(
        "compare", "layers, logits, generations", {}, lambda: _compare(folder, TARGET,
                                                                       COMPARE_HTML),
        after=("baseline", "target"))
    outcomes["consistency"] = stages.run(
        "consistency", f"{opts.repeat} runs, bitwise", {"repeat": opts.repeat},
        lambda: _consistency(opts, folder, target_opts), after=order)
    if not outcomes["compare"]["passed"] and opts.engine == "hf":
        _doctor(opts, folder, stages, outcomes, target_opts)
    return _finish(opts, folder, stages, outcomes, model_id)


def _check(opts: PortOptions) -> None:
    """Bad options, refused before any stage runs."""
    if opts.engine not in ("hf", "vllm"):
        raise InputError(f"{given('--engine', 'engine', opts.engine)}: choose hf or vllm")
    if opts.repeat < 2:
        raise InputError(f"{given('--repeat', 'repeat', opts.repeat)}: give 2 or more, the "
                         "target's run and one more")
    if opts.budget < 0:
        raise InputError(f"{given('--budget', 'budget', opts.budget)}: give 0 or more")
    if opts.mode not in ("full", "stats"):
        raise InputError(f"{given('--mode', 'mode', opts.mode)}: choose full or stats")
    if not (Path(opts.model) / "config.json").is_file():
        raise InputError(f"{opts.model} is not a Hugging Face model folder (no config.json)")
    folder = Path(opts.output)
    if folder.exists() and (not folder.is_dir() or (
            any(folder.iterdir()) and not (folder / "stages").is_dir())):
        raise InputError(f"{folder} exists and is not a port folder: choose another "
                         f"{option('-o', 'output=')}")
    if opts.engine == "vllm" and (opts.images or opts.audio or opts.feed or opts.backward):
        raise InputError("--engine vllm takes prompts only (no --image, --audio, --feed or "
                         "--backward)")
    if opts.engine == "vllm" and tuple(opts.keep_fp32) != ("auto",):
        raise InputError("--keep-fp32 is a Hugging Face capture's policy: a vLLM engine runs "
                         "its own (no --keep-fp32 with --engine vllm)")
    if opts.engine_args and opts.engine != "vllm":
        raise InputError("--engine-arg goes with --engine vllm")
    if opts.max_new_tokens < 0:
        raise InputError(f"{given('--max-new-tokens', 'max_new_tokens', opts.max_new_tokens)}: "
                         "give 0 or more")
    for flag, name, paths in (
            ("--prompts", "prompts_file", [opts.prompts_file] if opts.prompts_file else []),
            ("--image", "images", opts.images), ("--audio", "audio", opts.audio),
            ("--feed", "feed", [opts.feed] if opts.feed else [])):
        missing = next((p for p in paths if not Path(p).is_file()), None)
        if missing is not None:
            raise InputError(f"{given(flag, name, missing)}: no such file")
    from ...runtime.run.runner import check_feed_alone

    check_feed_alone(opts.feed, prompts=opts.prompts, prompts_file=opts.prompts_file,
                     images=opts.images, audio=opts.audio)
    if not folder.parent.is_dir():
        raise InputError(f"output folder {folder.parent} does not exist: create it first")


def _libraries() -> dict[str, str | None]:
    """The versions of the libraries a run's numbers depend on (None: not installed): an
    upgrade of one redoes the stages, as a CI cache of the port folder would otherwise
    replay the old verdict."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in ("torch", "transformers", "torch_npu", "vllm",
                                             "numpy")}


def _fingerprint(model: str) -> dict[str, Any]:
    """The model's identity as a capture records it: config hash, weights fingerprint."""
    from transformers import AutoConfig

    from ...runtime.models.identity import config_hash, weights_fingerprint

    config = AutoConfig.from_pretrained(model)
    return {"config_hash": config_hash(config),
            "weights_fingerprint": weights_fingerprint(Path(model))}


def _dump_facts(path: Path) -> dict[str, Any]:
    """What the report shows of a dump: device, dtype, records, environment, policy."""
    d = load(path)
    device = d.meta.get("device") or {}
    engine = d.meta.get("engine") or {}
    return {"device_name": device.get("name", engine.get("device", "?")),
            "device": device.get("torch_device", "?"), "dtype": d.dtype,
            "records": len(d.entries), "env": d.meta.get("env") or {},
            "engine": engine.get("name") or ("vllm" if engine else "hf"),
            "engine_version": engine.get("version"),
            "model": d.meta.get("model") or {}, "policy": d.meta.get("policy") or {}}


def _compare(folder: Path, target: str, page: str) -> Outcome:
    """Compare a target run with the baseline; its per-layer report beside them."""
    from ...outputs.htmlreport import build

    report = compare(folder / BASE, folder / target)
    write_output(folder / page, build(report, load(folder / BASE), load(folder / target)),
                 force=True)
    return {**evidence.of_compare(report), "files": [page]}


def _consistency(opts: PortOptions, folder: Path, target_opts: Any) -> Outcome:
    """The target ``repeat`` times in all, its own run first, compared bitwise."""
    from ...runtime.run.runner import run_capture

    paths = [folder / TARGET]
    for i in range(2, opts.repeat + 1):
        out = folder / "consistency" / f"run{i}.st"
        out.parent.mkdir(exist_ok=True)
        if opts.engine == "vllm":
            _vllm_capture(opts, out)
        else:
            run_capture(replace(target_opts, output=str(out)), _quiet)
        paths.append(out)
    report = consistency_of([load(p) for p in paths])
    return {**evidence.of_consistency(report),
            "files": [str(p.relative_to(folder)) for p in paths[1:]]}


def _doctor(opts: PortOptions, folder: Path, stages: Stages, outcomes: dict[str, Outcome],
            target_opts: Any) -> None:
    """Scan, isolate, suggest, and the target again with the suggested fix."""
    from ...doctor.checks import scan_model, suggest
    from ...doctor.isolation import isolate

    def scan() -> Outcome:
        return {**evidence.of_scan(scan_model(replace(target_opts, output=str(folder / SCAN)))),
                "files": [SCAN]}

    def find() -> Outcome:
        from_files = bool(opts.images or opts.audio or opts.feed)
        base_policy = opts.keep_fp32[0] if opts.keep_fp32[:1] in (("auto",), ("none",)) \
            else "auto"
        s = suggest(opts.model, dtype=opts.dtype, device=opts.device, prompts=opts.prompts,
                    prompts_file=opts.prompts_file, keep_fp32=base_policy,
                    budget=opts.budget, max_new_tokens=opts.max_new_tokens,
                    replay=str(folder / BASE) if from_files else None, mode=opts.mode)
        return {**evidence.of_suggestion(s), "files": []}

    def fix() -> Outcome:
        keep = outcomes["suggest"]["keep_fp32"]
        run_fixed(keep)
        return {**_compare(folder, FIXED, FIXED_HTML), "keep_fp32": keep,
                "capture_args": " ".join(f"--keep-fp32 {shlex.quote(k)}" for k in keep),
                "files": [FIXED, FIXED_HTML]}

    def run_fixed(keep: Sequence[str]) -> None:
        from ...runtime.run.runner import run_capture

        run_capture(replace(target_opts, output=str(folder / FIXED), keep_fp32=tuple(keep)),
                    _quiet)

    outcomes["scan"] = stages.run("scan", "headroom of the target run", {}, scan,
                                  after=("target",))
    outcomes["isolate"] = stages.run(
        "isolate", "each module alone on the baseline's inputs", {},
        lambda: {**evidence.of_isolate(isolate(folder / BASE, opts.model, dtype=opts.dtype,
                                               device=opts.device, keep_fp32=opts.keep_fp32,
                                               target=folder / TARGET)), "files": []},
        after=("baseline", "target"))
    outcomes["suggest"] = stages.run("suggest", f"a keep-fp32 policy, budget {opts.budget}",
                                     {"budget": opts.budget}, find, after=("target",))
    if outcomes["suggest"]["fixed"]:
        outcomes["fix"] = stages.run("fix", "the target again with the policy, compared",
                                     {"keep": outcomes["suggest"]["keep_fp32"]}, fix,
                                     after=("suggest", "baseline"))


def _vllm_capture(opts: PortOptions, out: Path) -> None:
    from ...engines.vllm.launch import EngineOptions, parse_engine_args, run_vllm_capture

    run_vllm_capture(EngineOptions(model=opts.model, output=str(out), dtype=opts.dtype,
                                   prompts=opts.prompts, prompts_file=opts.prompts_file,
                                   max_new_tokens=opts.max_new_tokens, mode=opts.mode,
                                   engine_args=parse_engine_args(opts.engine_args),
                                   force=True, quiet=True), _quiet)


def _finish(opts: PortOptions, folder: Path, stages: Stages, outcomes: dict[str, Outcome],
            model_id: dict[str, Any]) -> PortResult:
    """The verdict, and the three outputs written (the files of stages this run did not
    take, left by an earlier one, removed first)."""
    from .page import page

    stages.retire_others()

    cmp, cons, fix = outcomes["compare"], outcomes["consistency"], outcomes.get("fix")
    base, target = outcomes["baseline"], outcomes["target"]
    notes: list[str] = []
    if opts.baseline_device != "cpu":
        notes.append(f"the baseline ran on {base['device_name']}, not the CPU: its fp32 "
                     "kernels (TF32, reduction order) are the reference, so an error both "
                     "devices share is not seen")
    if opts.backward and "suggest" in outcomes:
        notes.append("the fix search (suggest) judges the forward pass; the fix stage "
                     "compares the gradients of the target run with it too")
    if opts.engine == "vllm" and not cmp["passed"]:
        notes.append("no keep-fp32 fix is searched for an engine's run (docs/vllm.md)")
    if cmp["passed"] and cons["passed"]:
        verdict = "pass"
        message = (f"matches the fp32 baseline within what {short(canonical(opts.dtype))} "
                   "costs, and is deterministic")
    elif not cmp["passed"] and fix is not None and fix["passed"]:
        verdict = "fixed"
        message = f"fails as is; passes with {fix['capture_args']} (verified)"
        if not cons["passed"]:
            message += "; not deterministic"
    elif cmp["passed"]:
        verdict = "fail"
        message = f"matches the baseline but is not deterministic: {cons['summary']}"
    elif fix is not None:  # suggest's own check passed, the port's comparison did not
        verdict = "fail"
        message = (f"fails as is, and with the suggested {fix['capture_args']} too: "
                   f"{fix['summary']}")
    else:
        sug = outcomes.get("suggest")
        verdict = "fail"
        message = "fails as is" + (f"; {sug['message']}" if sug else "")
    checks: list[Check] = evidence.checks(outcomes, dtype=short(canonical(opts.dtype)),
                                          repeat=opts.repeat, backward=opts.backward)
    facts = base["model"]
    model = {"name": Path(opts.model).name, "path": str(opts.model), "class": facts.get("class"),
             **model_id, "parameters": _parameters(Path(opts.model))}
    env = target["env"]
    # the libraries that computed the numbers (a device plugin's too, torch_npu, CANN...)
    versions = {k: str(v) for k, v in env.items() if k not in ("platform", "python", "numpy")}
    if target.get("engine_version"):
        versions["vllm"] = str(target["engine_version"])
    files = {"report_html": "report.html", "port_json": "port.json", "port_md": "PORT.md",
             "compare_html": COMPARE_HTML, "base": BASE, "target": TARGET}
    if fix is not None:
        files |= {"fixed": FIXED, "fixed_compare_html": FIXED_HTML}
    result = PortResult(
        verdict=verdict, message=message, folder=str(folder), model=model,
        baseline={"device": opts.baseline_device, "device_name": base["device_name"],
                  "dtype": "fp32", "references": base.get("references", [])},
        target={"device": opts.device, "device_name": target["device_name"],
                "dtype": short(canonical(opts.dtype)), "engine": opts.engine,
                # an engine runs its own dtype policy: no --keep-fp32 there
                "keep_fp32": list(opts.keep_fp32) if opts.engine == "hf" else []},
        versions=versions, checks=tuple(checks),
        fix=None if fix is None else {k: fix[k] for k in ("keep_fp32", "capture_args",
                                                          "passed", "summary")},
        stages=tuple(stages.runs), files=files, notes=tuple(notes))
    write_output(folder / "port.json", result.to_json(), force=True)
    write_output(folder / "PORT.md", result.to_markdown(), force=True)
    write_output(folder / "report.html", page(result, outcomes), force=True)
    return result


def _parameters(folder: Path) -> int | None:
    """Parameters stored in the model folder's safetensors files (headers only read)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():  # noqa: SIM118 (a safe_open handle)
                n = 1
                for s in st.get_slice(k).get_shape():
                    n *= s
                total += n
    return total


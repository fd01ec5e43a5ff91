"""Record per-module outputs of a torch model into a dump (behind ``precision.capture``).

>>> with precision.capture(model, "run.st") as cap:      # doctest: +SKIP
...     model(**inputs)
>>> cap.dump["encoder.block.0.layer.1.DenseReluDense.wo:out"]   # doctest: +SKIP

Every selected module's output is recorded in execution order (the order modules finish).
Tuple/dict outputs are flattened with stable keys (``:out.0``, ``:out.logits``); a module
that runs again gets a call suffix (``#1``, ``#2``...). An output that is the very tensor
object of an input (eval-mode dropout, T5's shared ``position_bias``) or of an earlier record
is stored once and recorded as an alias. The integer bucket ids fed to T5's
``relative_attention_bias`` are recorded as its inputs by default.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import os
import shutil
import tempfile
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ..._version import __version__
from ...dumps import load
from ...dumps.atomic import check_output_path
from ...dumps.dump import Dump, DumpWriter
from ...dumps.keys import CAST_PREFIX, make_key, parse_key
from ...errors import InputError, PrecisionError, option
from ..models.hybrid import instrument
from ..models.identity import model_identity
from .compute import compute_settings, environment
from .deferred import DeferredStats
from .realtokens import RealTokens
from .selection import matches, select_modules, unwrap
from .streaming import BackgroundWriter
from .tensors import tensor_version, torch_dtype_name
from .tensorstats import AUTO, fused_kernel, statistics_path, tensor_stats
from .trees import call_signature, flatten, named_arguments

#: modules whose inputs are recorded by default (T5's bucket ids)
DEFAULT_INPUT_GLOBS = ("*relative_attention_bias",)
GradGetter = Callable[[str, torch.nn.Parameter], "torch.Tensor | None"]
ROOT = "root"


def header_reserve(mode: str, modules: int) -> int:
    """Header bytes a capture of ``modules`` modules sets aside up front: a stats record's
    line holds its statistics, about 0.5 kB (its count sketch goes with the tensors:
    precision.dumps.dump.SKETCHES_KEY)."""
    return 65536 + (1024 if mode == "stats" else 512) * modules


def module_dtypes(tree: Iterable[tuple[str, torch.nn.Module]]) -> dict[str, str]:
    """The dtype of each module's own parameters (``"mixed"`` when they differ), of the
    ``(name, module)`` pairs of ``model.named_modules()``."""
    out = {}
    for name, mod in tree:
        kinds = {p.dtype for p in own_parameters(mod)}
        if kinds:
            out[name or ROOT] = torch_dtype_name(kinds.pop()) if len(kinds) == 1 else "mixed"
    return out


def half_precision(dtypes: dict[str, str]) -> str | None:
    """The half precision a model computes in, from :func:`module_dtypes`: the most common
    of ``float16``/``bfloat16`` among its modules' parameters, None where none has them.
    A model in fp16 with modules kept in fp32 (:func:`precision.keep_fp32`) is an fp16 run,
    though most of its records may be fp32; one whose parameters are all fp32 is left to
    what its records say (under autocast they are half)."""
    halves = [d for d in dtypes.values() if d in ("float16", "bfloat16")]
    return max(sorted(set(halves)), key=halves.count) if halves else None


def own_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``module.parameters(recurse=False)`` without its generator machinery (a capture
    walks every module of the model twice; that was a fifth of opening and closing one)."""
    return [p for p in module._parameters.values() if p is not None]


def device_type(tree: Iterable[tuple[str, torch.nn.Module]]) -> str:
    """The type of the first device other than the CPU (and ``meta``: offloaded) that holds
    a parameter of a module of ``tree`` (a model's ``named_modules()``), else ``cpu``."""
    for _, module in tree:
        for p in own_parameters(module):
            if p.device.type not in ("cpu", "meta"):
                return p.device.type
    return "cpu"


class _Process:
    """Lives as long as the process: the unsaved temporary dumps' folders are removed with
    it (``weakref.finalize`` runs at exit), or earlier when saved or aborted."""


_PROCESS = _Process()


class Capture:
    """Hooks on a model that stream its module outputs to a dump; use as a context manager.

    ``path`` is the dump to write (a temporary file when ``None``, removed when the process
    exits or the ``with`` block raises; :meth:`save` moves it).
    ``mode`` is ``"full"`` (tensors) or ``"stats"`` (statistics only). ``include``/``exclude``
    are globs on module names; ``inputs`` globs choose modules whose inputs are recorded too.
    ``meta`` is merged into the dump's metadata. ``buffer_mb`` sizes the reusable host
    buffer that bounds capture memory; ``fsync`` forces the dump to disk before it is renamed
    into place. ``detail`` adds the fp16 flush-to-zero count to stats records.
    ``root_inputs=False`` records the model's inputs only after :meth:`expect_inputs`.
    A model wrapped in DDP, DataParallel or a DeepSpeed engine is recorded as the model
    inside (see :func:`~precision.runtime.capture.selection.unwrap`); call the wrapper as usual.
    ``full`` globs pick modules whose outputs are stored whole in stats mode too.
    ``level="ops"`` also records the torch operations each module's own forward calls
    (:mod:`precision.runtime.capture.ops`), ``ops_include``/``ops_exclude`` being globs on their
    names;
    ``inputs`` globs then record the inputs of the operations in matching modules too.
    ``dry_run`` writes nothing: it records the entries and counts, in :attr:`planned`, the
    tensor bytes a full and a stats capture would store and how many tensors stats keeps
    (works on the ``meta`` device).
    A hybrid linear-attention model's delta rule and causal convolution, functions of its
    code, are recorded as its layers' children (:mod:`precision.runtime.models.hybrid`).
    Setting :attr:`steps` to a set of numbers records module outputs only during those calls
    of the model (0 is the first; a generation calls it once per decoding step, and an
    encoder's run before step 0 counts as step 0); ``None`` (the default) records all.
    ``deferred`` chooses how stats mode brings statistics to the host: ``True`` queues them
    on the device and reads them all after the forward
    (:mod:`~precision.runtime.capture.deferred`: no synchronisation per record), ``False``
    reads each as it is made (:func:`~precision.runtime.capture.tensorstats.tensor_stats`);
    ``None`` (the default) defers on an accelerator and not on the CPU.
    """

    def __init__(self, model: torch.nn.Module, path: str | os.PathLike[str] | None = None, *,
                 mode: str = "full", include: Sequence[str] = (), exclude: Sequence[str] = (),
                 inputs: Sequence[str] = DEFAULT_INPUT_GLOBS, force: bool = False,
                 meta: dict[str, Any] | None = None, buffer_mb: int = 64,
                 fsync: bool = False, detail: bool = False, root_inputs: bool = True,
                 every: int = 1, backward: bool = False, loss_scale: float = 1.0,
                 full: Sequence[str] = (), dry_run: bool = False, level: str = "modules",
                 ops_include: Sequence[str] = (), ops_exclude: Sequence[str] = (),
                 deferred: bool | None = None) -> None:
        if mode not in ("full", "stats"):
            raise InputError(f"unknown capture mode {mode!r}: use full or stats")
        if level not in ("modules", "ops"):
            raise InputError(f"unknown capture level {level!r}: use modules or ops")
        self.level = level
        self._ops_globs = (tuple(ops_include), tuple(ops_exclude))
        self._stack: list[str] = []
        self._op_mode: Any = None
        self.model = unwrap(model)
        self.mode = mode
        self.meta: dict[str, Any] = dict(meta or {})
        if self.model is not model:
            self.meta["wrapped_in"] = type(model).__name__
        self._tmpdir: str | None = None
        self._remove_tmpdir: Callable[[], Any] = lambda: None
        if path is None and not dry_run:  # removed at exit, when aborted, or by save()
            self._tmpdir = tempfile.mkdtemp(prefix="precision-")
            self._remove_tmpdir = weakref.finalize(_PROCESS, shutil.rmtree, self._tmpdir, True)
            path = Path(self._tmpdir) / "capture.st"
        self.path = Path(path or "dry-run.st")
        self._force = force
        if every < 1:
            raise InputError(f"{option('--every', 'every')} must be 1 or more")
        instrument(self.model)  # before the modules are chosen: it adds children
        #: ``model.named_modules()``, walked once: opening and closing read it several times
        self._tree = list(self.model.named_modules())
        self._modules = select_modules(self._tree, include, exclude, every)
        if not self._modules and (include or exclude):
            globs = option("--include/--exclude", "include/exclude")
            raise InputError(f"no module matches {globs}: nothing would be captured")
        self._input_globs = tuple(inputs)
        self._full_globs = tuple(full)
        names = [ROOT] + [n for n, _ in self._tree if n]
        for glob in self._full_globs:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise InputError(f"{option('--full', 'full')} {glob} matches no module: "
                                 "check the names with `precision inspect` on a dump (or "
                                 f"{option('--dry-run', 'dry_run=True')})")
        self._dry_run = dry_run
        self.planned = {"full": 0, "stats": 0, "stats_tensors": 0}
        self.steps: set[int] | None = None
        self._buffer = buffer_mb * 1024 * 1024
        self._fsync = fsync
        self._detail = detail
        self._defer = deferred
        self._deferred: DeferredStats | None = None
        #: the CPU statistics' kernel (tensorstats.fused_kernel), found when the dump opens
        self._kernel: Any = AUTO
        #: what computes a stats capture's numbers (set when the dump opens; the metadata's
        #: ``statistics``): the one-pass kernel, torch's reductions and why, or deferred
        self.statistics: dict[str, str] | None = None
        #: the stats entries whose numbers the deferred path still owes: (entry, ticket)
        self._owed: list[tuple[dict[str, Any], int]] = []
        self._want_inputs = root_inputs
        #: the model's recorded attention masks, for stats mode
        self._tokens = RealTokens()
        self._backward = backward
        self.loss_scale = loss_scale
        self._grad_calls: dict[str, int] = {}
        self._handles: list[Any] = []
        self._entries: list[dict[str, Any]] = []
        self._calls: dict[str, int] = {}
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], str, int | None]] = {}
        #: records with no values a dump can hold (meta-device, sparse, complex...), by kind
        self._left_out: Counter[str] = Counter()
        self._writer: DumpWriter | None = None
        self._bg: BackgroundWriter | None = None
        self._dump: Dump | None = None
        self.logits_key: str | None = None
        self._logits_next = True  # the first call's logits, unless expect_inputs() says
        self._closed = False  # the with block ended and the dump is written
        self._quiet: warnings.catch_warnings[Any] | None = None  # torch's warnings muted

    # ---- context management
    def __enter__(self) -> Capture:
        if not self._dry_run:
            self._open_writer()
        if self._backward:  # torch's warnings on the backward hooks, muted: for modules fed
            # token ids (no gradient to them), whose outputs' gradients still come; for a
            # module returning a ModelOutput (T5Stack), whose tensor's gradient is recorded
            # at the module that made it (an alias of it here)
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            for said in ("Full backward hook is firing when gradients are computed with "
                         "respect to module outputs", "For backward hooks to be called, "
                         "module output should be a Tensor or a tuple of Tensors"):
                warnings.filterwarnings("ignore", message=said)
        for name, mod in self._modules:
            self._handles.append(mod.register_forward_hook(self._hook(name), with_kwargs=True))
            if self._backward:
                self._handles.append(mod.register_full_backward_hook(self._grad_hook(name)))
        self._handles.append(self.model.register_forward_pre_hook(self._root_inputs,
                                                                  with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_hook, with_kwargs=True))
        if self.level == "ops":
            self._enter_ops()
        return self

    def _enter_ops(self) -> None:
        """Keep the stack of running modules and record the operations they call."""
        from .ops import OpCapture

        def enter(name: str) -> Any:
            return lambda _module, _args: self._stack.append(name)

        def leave(_module: Any, _args: Any, _output: Any) -> None:
            self._stack.pop()

        for name, mod in [(ROOT, self.model), *self._modules]:
            self._handles.append(mod.register_forward_pre_hook(enter(name)))
            self._handles.append(mod.register_forward_hook(leave))
        self._op_mode = OpCapture(self._stack, self._op, *self._ops_globs,
                                  snapshot=lambda module: matches(module, self._input_globs))
        self._op_mode.__enter__()

    def _op(self, module: str, op: str, func: Any, output: Any, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> None:
        """One operation called by ``module``'s own forward: ``module/op:out[.i][#n]``. With
        its inputs recorded, its first output's entry holds ``op_call``: the function and
        its arguments, for ``precision check`` to run it again."""
        from .ops import call_spec, func_path, storable

        name = f"{module}/{op}"
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        if self.steps is not None and self._calls.get(ROOT, 0) not in self.steps:
            return
        signature = call_signature(args, kwargs)
        replay: dict[str, Any] | None = None
        if matches(module, self._input_globs):
            inputs = list(flatten(args)) + list(flatten(kwargs))
            for idx, t in inputs:
                if storable(t):
                    self._record(name, "in", idx or "0", call, t, signature)
            path, spec = func_path(func), call_spec(args, kwargs)
            if (path is not None and spec is not None and not op.startswith(CAST_PREFIX)
                    and all(storable(t) for _, t in inputs)):
                replay = {"func": path} | spec
        for idx, t in flatten(output):
            if t.is_floating_point() and storable(t):
                self._record(name, "out", idx, call, t, signature)
                if replay is not None:
                    self._entries[-1]["op_call"] = replay
                    replay = None
                if self._backward and t.requires_grad:
                    t.register_hook(self._op_grad_hook(name, idx, call))

    def _open_writer(self) -> None:
        check_output_path(self.path, force=self._force)
        dev = device_type(self._tree)
        if self.mode == "stats":  # first: PRECISION_KERNEL=numba may refuse, before any file
            self._choose_statistics(dev)
        self._writer = DumpWriter(self.path, force=self._force, fsync=self._fsync,
                                  reserve=self.header_reserve)
        ring = self._buffer if self.mode == "full" else 4 * 1024 * 1024
        self._bg = BackgroundWriter(self._writer, device_type=dev, buffer_bytes=ring)

    def _choose_statistics(self, dev: str) -> None:
        """Deferred on an accelerator (unless ``deferred=False``), the one-pass kernel on
        the CPU where it loads, else torch's reductions: :attr:`statistics` says which."""
        if dev != "cpu" if self._defer is None else self._defer:
            self._deferred = DeferredStats(detail=self._detail)
            self._tokens.gather = True
            self.statistics = {"path": "deferred"}
        elif dev == "cpu":
            self._kernel = fused_kernel()  # once: each record's lookup is a cold one
            self.statistics = statistics_path(self._kernel)
        else:
            self.statistics = {"path": "torch", "why": f"deferred=False on {dev}"}

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._op_mode is not None:
            self._op_mode.__exit__(None, None, None)
            self._op_mode = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise
        self._closed = True

    def _abort(self) -> None:
        if self._deferred is not None:
            self._deferred.release()
        if self._bg is not None:
            with contextlib.suppress(Exception):  # the original exception matters more
                self._bg.finish()
        if self._writer is not None:
            self._writer.abort()
        self._remove_tmpdir()  # nothing was written to keep

    def _finish(self) -> None:
        if self._dry_run:
            return
        if not self._entries:
            warnings.warn(f"nothing ran inside the capture of {type(self.model).__name__}: "
                          f"{self.path} holds no records (call the model inside the `with` "
                          "block)", stacklevel=3)
        assert self._writer is not None
        if self._deferred is not None:
            done = self._deferred.results()
            self._deferred.release()  # the arenas' device memory
            for entry, ticket in self._owed:
                entry["stats"] = done[ticket] | entry["stats"]  # "padded" stays last
            self._owed.clear()
        if self._bg is not None:
            self._bg.finish()
        self._writer.close(self._metadata())
        self._seen.clear()

    def __repr__(self) -> str:
        what = "dry run" if self._dry_run else str(self.path)
        done = (f"{len(self._entries)} record(s) written" if self._closed else
                f"{len(self._modules)} module(s) hooked, {len(self._entries)} record(s) so far")
        return f"<Capture {self.mode} of {type(self.model).__name__} -> {what}: {done}>"

    # ---- public helpers
    def add_tensor(self, key: str, tensor: torch.Tensor, *, kind: str = "extra",
                   whole: bool = True) -> str:
        """Store an extra tensor whole, in any mode (``generation:tokens``, or a call's
        ``engine:in.positions#2``); with ``whole=False`` as module outputs are stored (its
        statistics in stats mode). Returns the key."""
        k = parse_key(key)
        self._store(key, k.module, kind, k.index, k.call, tensor, alias=None, whole=whole)
        return key

    @property
    def module_count(self) -> int:
        """How many modules this capture records."""
        return len(self._modules)

    @property
    def header_reserve(self) -> int:
        """Bytes set aside for the header up front (rewritten larger if it outgrows them)."""
        return header_reserve(self.mode, len(self._modules))

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The records so far, in execution order (what the dump's metadata will list)."""
        return self._entries

    @property
    def dump(self) -> Dump:
        """The written dump, opened for reading (after the ``with`` block)."""
        if self._dump is None:
            self._dump = load(self.path)
        return self._dump

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Move (or copy) the written dump to ``path``; returns the new path."""
        dest = Path(path)
        check_output_path(dest, force=force)
        if self._tmpdir is None:
            shutil.copyfile(self.path, dest)
        else:
            shutil.move(str(self.path), dest)
            self._remove_tmpdir()
            self._tmpdir = None
            self.path = dest
        self._dump = None
        return dest

    # ---- hooks
    def _hook(self, name: str) -> Any:
        record_inputs = matches(name, self._input_globs)

        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            if self.steps is not None and self._calls.get(ROOT, 0) not in self.steps:
                return  # the model's calls finished so far: the decoding step under way
            signature = call_signature(args, kwargs)
            if record_inputs:
                for idx, t in list(flatten(args)) + list(flatten(kwargs)):
                    self._record(name, "in", idx or "0", call, t, signature)
            if isinstance(output, torch.Tensor):  # most modules: flatten's answer, sooner
                self._record(name, "out", "", call, output, signature)
                return
            for idx, t in flatten(output):
                self._record(name, "out", idx, call, t, signature)

        return hook

    def expect_inputs(self) -> None:
        """Make the model's next call the main one: its inputs are recorded (what
        ``--replay`` reuses) and its logits become the dump's logits (instead of the first
        call's: a generation's single-token steps come before the teacher-forced forward)."""
        self._want_inputs = True
        self._logits_next = True

    def _grad_hook(self, name: str) -> Any:
        """Record the gradient of the loss with respect to the module's output (``:grad``),
        unscaled (divided by ``loss_scale``) and in fp32, so runs with different loss
        scales compare; an fp16 gradient that overflowed stays inf."""

        def hook(module: torch.nn.Module, grad_input: Any, grad_output: Any) -> None:
            call = self._grad_calls.get(name, 0)
            self._grad_calls[name] = call + 1
            for idx, t in flatten(grad_output):
                self._store(make_key(name, "grad", idx, call), name, "grad", idx, call,
                            t.detach().float() / self.loss_scale, alias=None)

        return hook

    def _op_grad_hook(self, name: str, idx: str, call: int) -> Any:
        """Record the gradient with respect to an operation's output (``MODULE/OP:grad``),
        unscaled and in fp32 as a module's, keyed by the operation's forward call."""

        def hook(grad: torch.Tensor) -> None:
            self._store(make_key(name, "grad", idx, call), name, "grad", idx, call,
                        grad.detach().float() / self.loss_scale, alias=None)

        return hook

    def add_parameter_grads(self, grad_of: GradGetter | None = None) -> int:
        """Store every parameter's gradient (``<param>:pgrad``), unscaled, after backward.

        ``grad_of(name, param)`` returns a parameter's full gradient where ``param.grad`` does
        not hold it: under DeepSpeed ZeRO-3 the gradients are partitioned, and
        ``lambda name, p: deepspeed.utils.safe_get_full_grad(p)`` gathers them.
        Returns how many were stored.
        """
        n = 0
        for pname, p in self.model.named_parameters():
            grad = p.grad if grad_of is None else grad_of(pname, p)
            if grad is not None:
                self._store(f"{pname}:pgrad", pname, "pgrad", "", 0,
                            grad.detach().float() / self.loss_scale, alias=None)
                n += 1
        return n

    def _root_inputs(self, module: torch.nn.Module, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> None:
        """Record the model's own inputs (first call, or the one announced by
        :meth:`expect_inputs`) so another run can replay them."""
        if self._want_inputs:
            self._want_inputs = False
            named = dict(flatten(named_arguments(module, args, kwargs)))
            for idx, t in named.items():
                self._store(make_key("input", idx), "input", "in", idx, 0, t, alias=None)
            self._tokens.set_inputs(named)

    def _root_hook(self, module: torch.nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any], output: Any) -> None:
        call = self._calls.get(ROOT, 0)
        self._calls[ROOT] = call + 1
        if self.steps is not None and call not in self.steps:
            return
        for idx, t in flatten(output):
            key = self._record(ROOT, "out", idx, call, t)
            if idx == "logits" and self._logits_next:
                self.logits_key = self._resolve(key)
                self._logits_next = False

    def _resolve(self, key: str) -> str:
        for e in self._entries:
            if e["key"] == key and e.get("alias_of"):
                return str(e["alias_of"])
        return key

    def _record(self, module: str, kind: str, idx: str, call: int, t: torch.Tensor,
                signature: str | None = None) -> str:
        """Store ``t`` under its key, or record an alias when this very tensor is stored already."""
        key = make_key(module, kind, idx, call)
        if t.layout != torch.strided or (t.is_meta and not self._dry_run):  # no values
            what = "meta-device" if t.is_meta else str(t.layout).removeprefix("torch.")
            self._left_out[f"{what} tensors"] += 1
            return key
        seen = self._seen.get(id(t))
        alias = None
        if (seen is not None and seen[0]() is t and seen[2] is not None
                and seen[2] == tensor_version(t)):
            alias = seen[1]  # the very tensor, unchanged since (an in-place op bumps _version)
        self._store(key, module, kind, idx, call, t, alias=alias, signature=signature)
        return key

    def _store(self, key: str, module: str, kind: str, idx: str, call: int, t: torch.Tensor,
               alias: str | None, whole: bool = False, signature: str | None = None) -> None:
        if self._op_mode is not None:
            with self._op_mode.pause():  # statistics and copies are no operations of the model
                self._store_entry(key, module, kind, idx, call, t, alias, whole, signature)
        else:
            self._store_entry(key, module, kind, idx, call, t, alias, whole, signature)

    def _store_entry(self, key: str, module: str, kind: str, idx: str, call: int,
                     t: torch.Tensor, alias: str | None, whole: bool,
                     signature: str | None) -> None:
        try:
            dtype = torch_dtype_name(t.dtype)
        except PrecisionError:  # complex, float8, uint16: nothing a dump holds
            self._left_out[f"{str(t.dtype).removeprefix('torch.')} tensors"] += 1
            return
        entry: dict[str, Any] = {"key": key, "module": module, "kind": kind, "index": idx,
                                 "call": call, "shape": list(t.shape), "dtype": dtype}
        if signature is not None:
            entry["signature"] = signature
        if alias is not None:
            entry["alias_of"] = alias
            self._entries.append(entry)
            return
        # ids and masks are kept whole even in stats mode, and so are --full modules
        whole = whole or (kind == "in" and not t.is_floating_point()) or bool(
            self._full_globs and matches(module, self._full_globs))
        if self._dry_run:
            nbytes = t.numel() * t.element_size()
            self.planned["full"] += nbytes
            self.planned["stats"] += nbytes if whole else 0
            self.planned["stats_tensors"] += int(whole)
        else:
            if self.mode == "stats":
                real, padded = self._tokens.select(key, t)
                if self._deferred is not None:
                    entry["stats"] = {}
                    self._owed.append((entry, self._deferred.add(real)))
                else:
                    entry["stats"] = tensor_stats(real, detail=self._detail, kernel=self._kernel)
                if padded:
                    entry["stats"]["padded"] = padded
            if self.mode == "full" or whole:
                assert self._bg is not None
                self._bg.submit(key, entry["dtype"], t)
        self._entries.append(entry)
        self._seen[id(t)] = (weakref.ref(t), key, tensor_version(t))

    # ---- metadata
    def _metadata(self) -> dict[str, Any]:
        dtypes = module_dtypes(self._tree)
        meta: dict[str, Any] = {
            "tool": "precision", "tool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": True, "mode": self.mode, "level": self.level, "env": environment(),
            "model": model_identity(self.model),
            "module_dtypes": dtypes,
            "compute": compute_settings(self.model, self._tree),
            "logits_key": self.logits_key,
            "entries": self._entries,
        }
        if self.statistics is not None:
            meta["statistics"] = self.statistics
        if self._left_out:
            meta["left_out"] = dict(self._left_out)
        half = half_precision(dtypes)
        if half is not None and "dtype" not in self.meta:
            meta["dtype"] = half  # a capture from Python: the CLI states its --dtype
        for k, v in self.meta.items():
            meta[k] = meta[k] | v if isinstance(v, dict) and isinstance(meta.get(k), dict) else v
        if meta.get("distributed") is None:  # a process group the caller started (DDP)
            from .distributed import describe

            meta["distributed"] = describe()
        return meta


"""Hybrid linear-attention models (Qwen3.5's Gated DeltaNet, Qwen3-Next): what their layers
compute in functions, recorded as submodules; and the delta rule's form.

A Gated DeltaNet layer (``model.layers.0.linear_attn``) computes its two steps that matter
most in module-level functions of transformers' modeling code, where no module hook sees
them: the causal depthwise convolution (``causal_conv1d_forward``, which also reads and
updates the convolution state the cache carries) and the gated delta rule
(``torch_chunk_gated_delta_rule`` over a prompt, ``torch_recurrent_gated_delta_rule`` one
token at a time), whose recurrent state ``S`` is the layer's memory:

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T,   o_t = S_t^T q_t

:func:`instrument` gives each such layer two parameterless children, so every capture
records them as modules (and ``--level ops`` the operations inside them):

- ``<layer>.causal_conv``: ``:out.output`` the convolution's output (``(batch, channels,
  seq)``), ``:out.state`` the convolution state the cache holds after the call;
- ``<layer>.delta_rule``: ``:out.output`` the delta rule's output (``(batch, seq, heads,
  head_dim)``), ``:out.state`` its final recurrent state (``(batch, heads, k_dim, v_dim)``),
  the state the cache carries to the next step.

A record whose index is ``state`` has no token axis (:data:`precision.dumps.keys.STATE`).
The children call the very function the model would (a kernel from the hub or FLA
included); with a ``form`` (:data:`FORMS`) every call of the delta rule runs in that form
instead: ``chunked`` or ``recurrent``, the two torch implementations transformers ships, a
kernel pair as eager and sdpa attention are. The module's functions are replaced once per
process by dispatchers that call the original unless an instrumented layer is running.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from torch import nn

from ...errors import InputError

#: the delta rule's forms: transformers' torch implementations, by name in its modeling code
FORMS = {"chunked": "torch_chunk_gated_delta_rule",
         "recurrent": "torch_recurrent_gated_delta_rule"}
CONV = "causal_conv1d_forward"
#: the children :func:`instrument` adds to a linear-attention layer
DELTA_CHILD, CONV_CHILD = "delta_rule", "causal_conv"
_FORM_ATTR = "_precision_delta_rule_form"
_running = threading.local()


class FunctionCall(nn.Module):
    """A function of a model's code run as a submodule, so that hooks see its call: its
    first argument is the function, the rest are the function's. Its output is a dict,
    ``output`` (and ``state``, where the call leaves one), so the records are named."""

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function

    def extra_repr(self) -> str:
        return self.function

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.function == CONV:
            out = fn(*args, **kwargs)
            cache, layer_idx = _conv_cache(args, kwargs)
            state = None
            if cache is not None and hasattr(cache, "get_conv_state"):
                state = cache.get_conv_state(layer_idx, state_idx=kwargs.get("state_idx", 0))
            return {"output": out} | ({} if state is None else {"state": state.clone()})
        out, state = fn(*args, **kwargs)
        return {"output": out} | ({} if state is None else {"state": state})


def _conv_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, int]:
    """``causal_conv1d_forward(conv1d, hidden_states, cache, layer_idx, ...)``'s cache and
    layer index, however they were passed."""
    cache = args[2] if len(args) > 2 else kwargs.get("cache")
    layer_idx = args[3] if len(args) > 3 else kwargs.get("layer_idx", 0)
    return cache, int(layer_idx)


def is_linear_attention(module: nn.Module) -> bool:
    """A Gated DeltaNet layer whose modeling code calls the delta rule as a function."""
    if not type(module).__name__.endswith("GatedDeltaNet"):  # every module of every capture
        return False
    code = sys.modules.get(type(module).__module__)
    return code is not None and all(hasattr(code, name) for name in FORMS.values())


def instrument(model: nn.Module, form: str | None = None) -> int:
    """Give every linear-attention layer of ``model`` its ``causal_conv`` and ``delta_rule``
    children (once), and run its delta rule in ``form`` (``chunked``, ``recurrent``; None
    keeps what it has: the model's own choice unless a form was set before). Returns how
    many layers are instrumented."""
    if form is not None and form not in FORMS:
        raise InputError(f"--delta-rule {form}: use {' or '.join(FORMS)}")
    n = 0
    for module in model.modules():
        if not is_linear_attention(module):
            continue
        n += 1
        if form is not None:
            setattr(module, _FORM_ATTR, form)
        if isinstance(getattr(module, DELTA_CHILD, None), FunctionCall):
            continue
        _patch(sys.modules[type(module).__module__])
        module.add_module(CONV_CHILD, FunctionCall(CONV))
        module.add_module(DELTA_CHILD, FunctionCall("gated_delta_rule"))
        module.register_forward_pre_hook(_enter)
        module.register_forward_hook(_leave, always_call=True)
    return n


def delta_rule_form(model: nn.Module) -> str | None:
    """The form the model's linear-attention layers were set to run (None: their own)."""
    forms = {getattr(m, _FORM_ATTR, None) for m in model.modules() if is_linear_attention(m)}
    return forms.pop() if len(forms) == 1 else None


def _stack() -> list[nn.Module]:
    if not hasattr(_running, "stack"):
        _running.stack = []
    stack: list[nn.Module] = _running.stack
    return stack


def _enter(module: nn.Module, _args: Any) -> None:
    _stack().append(module)


def _leave(module: nn.Module, _args: Any, _output: Any) -> None:
    stack = _stack()
    if stack and stack[-1] is module:
        stack.pop()


def _patch(code: Any) -> None:
    """Replace the modeling module's functions by dispatchers (once per module)."""
    originals: dict[str, Any] | None = getattr(code, "_precision_originals", None)
    if originals is not None:
        return
    originals = {name: getattr(code, name) for name in (*FORMS.values(), CONV)
                 if hasattr(code, name)}
    code._precision_originals = originals
    for name in originals:
        setattr(code, name, _dispatcher(name, originals))


def _dispatcher(name: str, originals: dict[str, Any]) -> Callable[..., Any]:
    """What the modeling code calls as ``name``: the original function outside an
    instrumented layer; inside one, the layer's child that records it, running the form
    the layer was given."""

    def call(*args: Any, **kwargs: Any) -> Any:
        stack = _stack()
        layer = stack[-1] if stack else None
        if layer is None:
            return originals[name](*args, **kwargs)
        if name == CONV:
            return getattr(layer, CONV_CHILD)(originals[name], *args, **kwargs)["output"]
        fn = originals[name]
        form = getattr(layer, _FORM_ATTR, None)
        if form is not None and FORMS[form] != name:
            fn = originals[FORMS[form]]
            if form == "recurrent":
                kwargs.pop("chunk_size", None)
        out = getattr(layer, DELTA_CHILD)(fn, *args, **kwargs)
        return out["output"], out.get("state")

    call.__name__ = name
    call.__wrapped__ = originals[name]  # type: ignore[attr-defined]
    return call


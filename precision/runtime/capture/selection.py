"""Which modules of a model a capture hooks: the model inside its DDP/DeepSpeed wrapper, then
its named submodules chosen by globs (``--include``/``--exclude``) and ``--every``."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch

from ...errors import InputError

#: wrappers whose ``.module`` is the real model: their names would prefix every key
WRAPPERS = ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/DataParallel/DeepSpeed wrappers, so that a wrapped run's keys
    (``encoder.block.0...``, not ``module.encoder.block.0...``) match an unwrapped one's."""
    while type(model).__name__ in WRAPPERS:
        devices = list(getattr(model, "device_ids", None) or [])
        if len(devices) > 1:
            raise InputError(f"DataParallel over {len(devices)} devices runs its "
                             "replicas in threads that share hooks: capture model.module on "
                             "one device, or use DistributedDataParallel")
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


def matches(name: str, globs: Sequence[str]) -> bool:
    """Whether a module name matches any of ``globs`` (``fnmatch``, case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def select_modules(model: torch.nn.Module | Iterable[tuple[str, torch.nn.Module]],
                   include: Sequence[str] = (), exclude: Sequence[str] = (),
                   every: int = 1) -> list[tuple[str, torch.nn.Module]]:
    """Named submodules to hook: all (or those matching ``include``) minus ``exclude``, of a
    model or of its ``named_modules()`` pairs already walked.

    ``every`` K keeps, of the repeated blocks (the first numbered component of a name, as in
    ``encoder.block.3`` or ``model.layers.12``), only those numbered 0, K, 2K, ...; modules
    outside numbered blocks are always kept.
    """
    chosen = []
    tree = model.named_modules() if isinstance(model, torch.nn.Module) else model
    for name, mod in tree:
        if not name:
            continue
        if every > 1:
            number = next((int(p) for p in name.split(".") if p.isdigit()), None)
            if number is not None and number % every:
                continue
        if include and not matches(name, include):
            continue
        if exclude and matches(name, exclude):
            continue
        chosen.append((name, mod))
    return chosen

"""Capture under ``torchrun``: every rank writes its own shard of one directory dump.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the process group is started with
the backend that fits the device (gloo on CPU, nccl on CUDA, hccl on Ascend NPUs) unless the
caller already started one. Each rank captures its share of the prompts (``prompts[rank::
world]``) into ``OUT/rank<r>.st``; after a barrier rank 0 writes ``OUT/index.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...dumps import load
from ...dumps.atomic import check_output_path
from ...dumps.dump import Dump
from ...dumps.shards import INDEX, shard_name, write_index
from ...errors import InputError, option

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
_STARTED = False  # whether we started the process group (then we also end it)


@dataclass(frozen=True)
class Dist:
    """This process's place in a multi-process run."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str

    def as_meta(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size,
                "local_rank": self.local_rank, "backend": self.backend,
                "group_ranks": group_ranks()}


def group_ranks() -> list[int]:
    """The ranks of the default process group (all of them, in order)."""
    import torch.distributed as td

    try:
        return [int(r) for r in td.get_process_group_ranks(td.group.WORLD)]
    except (AttributeError, RuntimeError, ValueError):  # older torch, or no group
        return list(range(td.get_world_size()))


def describe() -> dict[str, Any] | None:
    """This process's place in a process group someone else started (a training script
    calling ``precision.capture``), or None when there is none."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return None
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                td.get_backend(), "").as_meta()


def current(device: str) -> Dist | None:
    """The run's ranks, starting the process group if torchrun launched us; else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as td

    kind = device.split(":")[0]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not td.is_initialized():
        global _STARTED
        td.init_process_group(backend=BACKENDS.get(kind, "gloo"))
        _STARTED = True
    per_rank = device if kind == "cpu" else f"{kind}:{local}"
    return Dist(td.get_rank(), td.get_world_size(), local, td.get_backend(), per_rank)


def prepare_folder(folder: Path, dist: Dist, *, force: bool) -> Path:
    """Check and create ``folder`` (same decision on every rank); this rank's shard path."""
    if not folder.parent.is_dir():
        raise InputError(f"output folder {folder.parent} does not exist: create it first")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file: a multi-process capture writes a folder")
    if (folder / INDEX).exists() and not force:
        raise InputError(f"output {folder} already holds a dump: pass "
                         f"{option('--force', 'force=True')} to overwrite it")
    _barrier()
    if dist.rank == 0:
        folder.mkdir(exist_ok=True)
        (folder / INDEX).unlink(missing_ok=True)  # no index until every shard is written
    _barrier()
    shard = folder / shard_name(dist.rank)
    check_output_path(shard, force=True)
    return shard


def finish_folder(folder: Path, dist: Dist, meta: dict[str, Any]) -> Path:
    """Wait for every rank's shard; rank 0 then writes the index. Returns the folder."""
    _barrier()
    if dist.rank == 0:
        write_index(folder, dist.world_size, meta | {"backend": dist.backend})
    _barrier()
    import torch.distributed as td

    if _STARTED and td.is_initialized():
        td.destroy_process_group()
    return folder


def own_shard(replay: str, dist: Dist | None) -> Dump:
    """The dump to replay: this rank's shard of a directory dump, or the file itself; of a
    tensor-parallel engine's (``precision.vllm``), whose ranks all ran the same tokens, rank
    0's shard."""
    p = Path(replay)
    if dist is not None and p.is_dir():
        load(p)  # checks the index and that every shard is there
        return load(p / shard_name(dist.rank))
    found = load(p)
    if p.is_dir() and isinstance(found.meta.get("engine"), dict):
        return load(p / shard_name(0))
    return found


def split(prompts: list[str], dist: Dist) -> list[str]:
    """This rank's share of the prompts."""
    mine = prompts[dist.rank::dist.world_size]
    if not mine:
        raise InputError(f"{len(prompts)} prompt(s) for {dist.world_size} ranks: give at "
                         "least one prompt per rank")
    return mine


def _barrier() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.barrier()

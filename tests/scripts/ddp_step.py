"""One training step of the tiny T5 under DDP, captured per rank (run by torchrun, 2 ranks).

Every rank takes half of a fixed batch (equal token counts, so the mean of the two ranks'
mean losses is the whole batch's mean loss) and writes ``OUT/rank<r>.st`` with parameter
gradients, which DDP has averaged over the ranks. Rank 0 then also writes, without DDP,
``OUT/single.st`` (the whole batch in one process) and ``OUT/half.st`` (its half only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel

import precision


def step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    with precision.capture(model, path, backward=True, force=True) as cap:
        logits = model(**inputs).logits
        target = inputs["decoder_input_ids"]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 target[:, 1:].reshape(-1))
        loss.backward()
        cap.add_parameter_grads()
    model.zero_grad(set_to_none=True)


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 800, (2 * world, 12), generator=g),
             "attention_mask": torch.ones(2 * world, 12, dtype=torch.long),
             "decoder_input_ids": torch.randint(2, 800, (2 * world, 6), generator=g)}
    mine = {k: v[2 * rank:2 * rank + 2] for k, v in batch.items()}

    def fresh() -> torch.nn.Module:
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()

    step(DistributedDataParallel(fresh()), mine, out / f"rank{rank}.st")
    dist.barrier()
    if rank == 0:
        step(fresh(), batch, out / "single.st")
        step(fresh(), mine, out / "half.st")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Runs unchanged under ``torchrun --nproc-per-node N``: process group, device, sharded inference.

Without torchrun's environment (RANK/WORLD_SIZE) everything is a single process and the
helpers below do nothing. Only rank 0 writes files; every rank sees the same validation
numbers, so early stopping decides identically everywhere without extra messages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kidney_edge.errors import InputError

log = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True unless torchrun started this process with a rank other than 0.

    Readable before :func:`setup` (torchrun sets ``RANK`` in the environment), so the CLI can
    let rank 0 alone draw progress and print results.
    """
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto|cpu|cuda`` -> a torch.device; ``cuda`` without a GPU is an input error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(requested_device: str) -> DistContext:
    """Join torchrun's process group when its environment is present (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size == 1:
        return DistContext(device=device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = torch.distributed.get_rank()
    log.info("distributed training: rank %d of %d on %s", rank, world_size, device)
    return DistContext(rank=rank, world_size=world_size, device=device)


def teardown(context: DistContext) -> None:
    if context.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def sharded_map(
    context: DistContext, count: int, compute: Callable[[list[int]], torch.Tensor]
) -> torch.Tensor:
    """``compute(indices) -> (len, ...)`` over 0..count-1, split across ranks; full result on every rank.

    Rank r takes indices r, r + W, r + 2W, ...; the gathered shards are interleaved back
    into the original order.
    """
    if not context.distributed:
        return compute(list(range(count)))
    world = context.world_size
    mine = list(range(context.rank, count, world))
    local = compute(mine).to(context.device)
    per_rank = -(-count // world)
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=context.device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    stacked = torch.stack(gathered, dim=1).reshape(per_rank * world, *local.shape[1:])  # index r + k*W
    return stacked[:count].cpu()

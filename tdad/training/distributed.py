"""One training run as several processes under torchrun: which process this is, and the collectives train_sku uses.

`torchrun --nproc-per-node N -m inspector.cli train ...` starts N copies of the run (RANK, WORLD_SIZE, LOCAL_RANK in
their environment). Each trains a DistributedDataParallel copy of the phase's networks on its slice of every step's
global batch, so the data of a step and the averaged gradient are the single process's. A step's whole batch is drawn
by one rank (steps dealt round-robin: the synthesis is shared, not repeated) and scattered in slices; the memory
prior's descriptors are computed in shares and gathered. Alone, every method here is a no-op or the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from foundation.errors import ConfigError

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: its rank of `world` (0 of 1 alone) and its rank of `local_world` on its
    node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ranks:
        """The place torchrun gives this process (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); alone without
        them or with WORLD_SIZE 1."""
        if not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= env.keys() or int(env["WORLD_SIZE"]) <= 1:
            return cls()
        return cls(rank=int(env["RANK"]), world=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                   local_world=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))

    @property
    def lead(self) -> bool:
        """Rank 0: the one that logs, keeps the EMA, checkpoints and writes the SKU."""
        return self.rank == 0

    def device_name(self, name: str) -> str:
        """The device this rank trains on: among ranks on CUDA, cuda:LOCAL_RANK (one GPU per process)."""
        return f"cuda:{self.local_rank}" if self.world > 1 and torch.device(name).type == "cuda" else name

    @contextmanager
    def joined(self, device: torch.device, batch_size: int) -> Iterator[None]:
        """The run's process group (NCCL on CUDA, gloo on the CPU) while the body runs, destroyed on any exit (a
        body that returns waits for every rank's first); ConfigError first when the global batch does not split."""
        if self.world == 1:
            yield
            return
        if batch_size % self.world:
            raise ConfigError(f"batch_size={batch_size} does not divide by WORLD_SIZE={self.world} (the torchrun "
                              f"processes): give --batch-size a multiple of {self.world}")
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        try:
            yield
            dist.barrier()  # rank 0 has written the SKU when any rank returns
        finally:
            dist.destroy_process_group()

    def mine(self, items: range) -> range:
        """The items this rank takes of `items` dealt round-robin (every one alone)."""
        return items[self.rank :: self.world]

    def shares(self, drawn: Iterator[Batch], steps: range, device: torch.device) -> Iterator[Batch]:
        """Each step's batch as this rank trains on it: alone, `drawn`; among ranks, its slice of the whole batch of
        the step, which the rank that drew it (mine(steps)) scatters."""
        if self.world == 1:
            yield from drawn
            return
        spec: dict[str, tuple[torch.Size, torch.dtype]] | None = None
        for index in range(len(steps)):
            owner = index % self.world
            whole = next(drawn) if owner == self.rank else None
            if spec is None:  # every step of a phase has the same keys, shapes and dtypes
                shared = [None if whole is None else {k: (v.shape, v.dtype) for k, v in whole.items()}]
                dist.broadcast_object_list(shared, src=owner)
                spec = shared[0]
            share = {}
            for key, (shape, dtype) in spec.items():
                share[key] = torch.empty((shape[0] // self.world, *shape[1:]), dtype=dtype, device=device)
                slices = None if whole is None else [s.contiguous() for s in whole[key].chunk(self.world)]
                dist.scatter(share[key], slices, src=owner)
            yield share

    def mean_and_any(self, loss: torch.Tensor, flag: bool) -> tuple[float, bool]:
        """The step's loss over the global batch (the mean of the ranks' equal slices' means) and whether any rank
        raised `flag` (a Ctrl-C), so that every rank stops after the same step."""
        if self.world == 1:
            return loss.item(), flag
        both = torch.stack([loss.detach().float(), torch.tensor(float(flag), device=loss.device)])
        dist.all_reduce(both)
        total, flags = both.tolist()
        return total / self.world, flags > 0

    def gather(self, parts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every rank's parts, keyed by their place in the whole, on every rank (on the CPU; alone: `parts`)."""
        if self.world == 1:
            return parts
        every: list[dict[int, torch.Tensor] | None] = [None] * self.world
        dist.all_gather_object(every, {k: v.cpu() for k, v in parts.items()})
        return {k: v for part in every if part is not None for k, v in part.items()}

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """`module` as a phase trains it: alone, itself; among ranks, in DistributedDataParallel, which broadcasts
        rank 0's parameters and buffers first (the EMA weights only rank 0 keeps, too), its buffers before each
        forward, and averages the gradients of every backward pass. On CUDA its BatchNorm layers become
        SyncBatchNorm, so they normalise over the global batch; torch has no SyncBatchNorm on the CPU, where each rank
        normalises its own slice."""
        if self.world == 1:
            return module
        if device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


ALONE = Ranks()  # a process that is the whole run

"""Several processes, one training: ``torchrun --nproc_per_node=N -m tcurlora finetune ...``.

torchrun starts N copies of the command with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set; :func:`context`
joins them into one process group (NCCL on GPUs, gloo on the CPU) and gives each rank its device
(``cuda:$LOCAL_RANK`` or the CPU).  The network is wrapped in PyTorch's DistributedDataParallel, which averages
the gradients of the adapter's trainable values across ranks.

How the batch is split: a step's global batch is ``grad_accum × N`` micro-batches drawn from one seeded stream
(the same on every rank); rank r computes micro-batches r, r + N, ... of it (a DistributedSampler-style strided
split).  So N processes take exactly the step one process takes with ``grad_accum × N``, and a run's adapter
does not depend on how many processes computed it.  Rank 0 alone writes events, checkpoints and the adapter;
a stop request on any rank stops all of them at the same step.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Sequence

import torch

from .errors import TCURLoRAError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Whether micro-batch ``index`` of a step is this rank's to compute."""
        return index % self.world_size == self.rank

    def wrap(self, network: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through: DDP across ranks, the network itself alone."""
        if not self.distributed:
            return network
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=ids)

    def no_sync(self, model: torch.nn.Module, last: bool):
        """Skip DDP's gradient all-reduce for all but a rank's last micro-batch of a step (one exchange a step)."""
        return model.no_sync() if self.distributed and not last else nullcontext()

    def mean(self, value: float) -> float:
        """The mean of a number over ranks (the step's loss for the progress events)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t) / self.world_size

    def gather(self, values: Sequence[float]) -> List[float]:
        """Every rank's ``values`` concatenated in rank order (validation scores of each rank's share)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, list(values))
        return [v for part in out for v in part]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a stop request reaches all ranks at the same step)."""
        if not self.distributed:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TCURLoRAError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def is_main_process() -> bool:
    """Rank 0, or a run without torchrun (before any process group exists: the CLI opens its events here)."""
    return os.environ.get("RANK", "0") == "0"


def context(device_name: str) -> Context:
    """This process's place in a torchrun launch (joining the process group once), or a single-process context."""
    from .runtime import pick_device

    n = world_size()
    if n <= 1:
        return Context(0, 1, pick_device(device_name))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise TCURLoRAError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s); "
                                "use --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, n, device)


def finish(ctx: Context) -> None:
    """Leave the process group (after rank 0 has written its files)."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()

"""The process group: who this rank is, and the few collectives the trainer needs outside FSDP."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistError(RuntimeError):
    """The distributed environment is incomplete or unusable; the message says what to set."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. World size 1 (no process group) is the single-process path: every
    collective below is then the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for a collective live: the rank's GPU under nccl, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Returned reduced (in place where `t` already lives on comm_device). op: sum or max."""
        if self.enabled:
            moved = t.to(self.comm_device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
            if moved is not t:
                t.copy_(moved)
        return t

    def sum_floats(self, *values: float) -> list[float]:
        """Each value summed over ranks (fp64, so that sums of per-rank loss sums stay exact to the printout)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        return self.all_reduce(t).tolist()

    def max_floats(self, *values: float) -> list[float]:
        """Each value's maximum over ranks, in one collective."""
        if not self.enabled:
            return list(values)
        return self.all_reduce(torch.tensor(values, dtype=torch.float64), op="max").tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank (a count a wall-clock budget fixed, say)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def single_process() -> Dist:
    return Dist()


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> Dist:
    """Join the job torchrun (or srun, or a PyTorchJob) started, from RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT: gloo when training on CPU, nccl on CUDA. Without WORLD_SIZE > 1, nothing
    happens and the single-process path runs."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise DistError(f"WORLD_SIZE is {world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                        "set; start the job with torchrun (torchrun --nproc_per_node N -m dbrx train CONFIG.yaml) "
                        "or set every one of " + ", ".join(_ENV))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise DistError("device: 'cuda' was asked for but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise DistError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                            "start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
        raise DistError(f"this torch build has no {backend} backend for a {world}-process job")
    if not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend, **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, backend=backend)

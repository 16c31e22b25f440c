"""Data-parallel training under torchrun (DistributedDataParallel).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process; without them every function here
is the single-process identity. Rank 0 writes the run's files; the
others train, evaluate their shard and take part in every reduction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # Started by torchrun (or a multi-task SLURM job): a process group even of one process, as
    # torchvision's references do, so that `torchrun --nproc_per_node=1` runs the same DDP path
    # (NCCL on a GPU) as eight processes do.
    launched: bool = False

    @property
    def enabled(self) -> bool:
        return self.launched or self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_env() -> None:
    """torchrun's variables, where RANK and WORLD_SIZE say this is one of its processes: the
    rendezvous's address too (torch's own error is a page of traceback, deep inside it)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        from resnet_train.errors import ConfigError

        raise ConfigError(
            f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: start the processes "
            "with resnet-train --nproc-per-node=N or torchrun, which set them all (or unset "
            "RANK and WORLD_SIZE for one process)"
        )


def from_env() -> Dist:
    """The process's place in a torchrun job, read from torchrun's environment variables; in a
    SLURM job of several tasks started by submitit (hydra/launcher=slurm), from SLURM's."""
    if (
        "RANK" not in os.environ
        and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    ):
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    check_env()
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Dist(int(os.environ["RANK"]), world, local_rank, launched=True)


# A CPU (gloo) group beside the training backend, for the host-side flags every step exchanges
# (stop signals): they never wait for the GPU.
_host_group: Any = None


def setup(device: torch.device, d: Dist) -> None:
    """Join the torchrun job `d` (NCCL on CUDA, gloo on the CPU)."""
    global _host_group
    if not d.enabled or dist.is_initialized():
        return
    from resnet_train.engine.preemption import signals_end_the_process

    backend = "nccl" if device.type == "cuda" else "gloo"
    with signals_end_the_process():  # (a peer that never comes: a stop signal still stops)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        _host_group = dist.new_group(backend="gloo") if backend != "gloo" else None


def world_size() -> int:
    """How many processes train together (1 outside a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def teardown() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def device_for(name: str, d: Dist) -> torch.device:
    """Each process's own GPU (cuda:LOCAL_RANK) when the run is on CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        # set_device needs an index; "cuda" alone means this process's GPU
        device = torch.device("cuda", d.local_rank if d.enabled else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of `values` over all processes (the tensor itself when there is one)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """The largest of `values` over all processes (the tensor itself when there is one)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def any_flag(value: int | None) -> int | None:
    """A host-side value (a received signal number, or None) that any process has: the largest,
    so that every process takes the same decision at the same step."""
    if world_size() == 1:
        return value
    flag = torch.tensor([value or 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group)
    return int(flag) or None


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order ([obj] alone without DDP)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_host_group)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every process. DDP does this before
    each training forward; after an epoch's last step each process holds the statistics of its
    own last batch, so they are made equal again before validation and checkpoints."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier(group=_host_group)


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of the model's parameters and buffers, to compare across processes."""
    import hashlib

    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

"""Ranks of a ``torchrun`` launch: PyTorch's own process groups, nothing home-made.

``torchrun --nproc-per-node N -m moedd.cli evaluate ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in the environment (``--nnodes``/``--rdzv-*`` for
several machines). :func:`ranks_from_env` joins the default process group (gloo on the CPU, NCCL
with CUDA) and says which rank this process is; without those variables (a plain ``moedd``) it
returns None and nothing distributed happens. With CUDA, CUDA tensors go through NCCL and
CPU tensors through gloo (a CPU run on a GPU machine works too, with any number of ranks). Collectives time out after ``MOEDD_DIST_TIMEOUT``
seconds (default 1800, gloo's own default), so a dead rank ends the others with an error instead
of a hang; tests set it short.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Rank 0: owns tracking and the outputs."""
        return self.rank == 0

    def share(self, items: list[Any]) -> list[Any]:
        """This rank's share of ``items``: every world-th one, starting at its rank."""
        return items[self.rank::self.world]

    def device(self, requested: torch.device) -> torch.device:
        """A CUDA request becomes this rank's own GPU (``LOCAL_RANK``); the CPU stays the CPU."""
        return torch.device("cuda", self.local_rank) if requested.type == "cuda" else requested


def ranks_from_env() -> Ranks | None:
    """Join the process group of a ``torchrun`` launch (once); None when not launched by one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():  # CUDA tensors through NCCL on this rank's own GPU, CPU ones through gloo
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local < torch.cuda.device_count():  # a CPU run may have more ranks than the machine has GPUs
                torch.cuda.set_device(local)
            backend = "cpu:gloo,cuda:nccl"
        timeout = timedelta(seconds=float(os.environ.get("MOEDD_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    """Wait until every rank gets here."""
    dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_experts(local: torch.Tensor) -> torch.Tensor:
    """Every rank's experts' features, concatenated in rank order along dim 0, with autograd:
    (k, ...) on each rank -> (world·k, ...). The backward of ``all_gather`` sums, over the ranks,
    the gradients each rank's loss sends to this rank's slice (a reduce-scatter)."""
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # its suggested replacement is a private module
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(local.contiguous()))


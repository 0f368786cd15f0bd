"""The few collectives a data-parallel trial needs, behind one small object.

A trial that holds several devices runs as one process per device (Ray Train workers, see
`sweep`). Every rank executes the same phase logic; rank 0 alone owns the store, the resume
points and the status rows. The ranks agree through these collectives: rank 0's weights and
decisions are broadcast, scores are gathered to rank 0, losses are summed across ranks.
With one process every method is a no-op, so the single-device path pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_torch() -> "Group":
        """The process group torch.distributed already holds (Ray Train sets it up), or one process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return Group(dist.get_rank(), dist.get_world_size())
        return Group()

    def _device(self) -> torch.device:
        import torch.distributed as dist

        # NCCL moves only CUDA tensors; gloo only CPU ones.
        return (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def gather(self, obj: Any) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        return bool(self.sum(torch.tensor([0.0 if flag else 1.0]))[0] == 0)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor on the caller's device)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        buf = values.detach().to(self._device(), dtype=torch.float64, copy=True)
        dist.all_reduce(buf)
        return buf.to(values.device)

    def sync_module(self, model: torch.nn.Module) -> None:
        """Make every rank's weights rank 0's (after rank 0 alone read them from a file)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)


SINGLE = Group()

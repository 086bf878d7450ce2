"""torch.distributed for fmask: one process per GPU (or several CPU processes), launched by ``torchrun``.

``torchrun --nproc-per-node K -m fmask fisher|query|train ...`` sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`init_from_env` sees them and joins the process group (nccl when CUDA is available, gloo
otherwise). Without them, or with WORLD_SIZE=1, nothing is initialised and every helper here degrades to the
single-process identity (shard = everything, reductions = no-ops), so callers need no special case.

Conventions: shards are contiguous, rank-ordered blocks, so concatenating the ranks' results in rank order gives
exactly the single-process order; rank 0 (:func:`is_main`) alone takes locks, writes artifacts and prints.
"""

from __future__ import annotations

import atexit
import gc
import os
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from fmask.core.errors import FmaskError

T = TypeVar("T")

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Long enough for rank 0 to write a large artifact while the others wait at a barrier.
_TIMEOUT = timedelta(minutes=int(os.environ.get("FMASK_DIST_TIMEOUT_MINUTES", "60")))


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of more than one process."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return False
    return int(os.environ["WORLD_SIZE"]) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that locks, writes and prints."""
    return rank() == 0


def backend_for(cuda_available: bool) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if cuda_available else "gloo"


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (idempotent); False when not launched distributed.

    ``device`` is the command's --device: ``cpu`` forces gloo even on a GPU machine. With nccl each process
    takes the GPU of its LOCAL_RANK, so a plain ``cuda`` device means that GPU from then on.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise FmaskError("this PyTorch build has no torch.distributed; launch without torchrun")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise FmaskError(f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); lower "
                             "--nproc-per-node to the GPU count")
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend_for(use_cuda), timeout=_TIMEOUT)
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Free unreachable DistributedDataParallel wrappers while the group still exists: left to the interpreter's
        # exit, a reducer torn down after the group aborts the process ("terminate called without an active
        # exception"), turning a finished run into a SIGABRT.
        gc.collect()
        dist.destroy_process_group()


def communication_device() -> torch.device:
    """Where collective tensors must live: the process's GPU under nccl, the CPU under gloo."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(count: int, *, align: int = 1, of_rank: int | None = None, size: int | None = None
                 ) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous block of ``count`` items.

    Blocks are whole multiples of ``align`` items (except the last), so a rank's batches of ``align`` samples
    are exactly the batches a single process would form: per-sample results then match bit for bit. A rank may
    get nothing (fewer units than ranks); every caller handles an empty block.
    """
    size = world_size() if size is None else size
    which = rank() if of_rank is None else of_rank
    units = -(-count // max(align, 1))
    # Rounded up: lower ranks take the spare units, so the last (possibly partial) unit lands on the lightest rank.
    start_unit, stop_unit = -(-units * which // size), -(-units * (which + 1) // size)
    return min(count, start_unit * align), min(count, stop_unit * align)


def shard(ids: Sequence[T], *, align: int = 1) -> list[T]:
    """This rank's contiguous block of ``ids`` (all of them when not distributed)."""
    start, stop = shard_bounds(len(ids), align=align)
    return list(ids[start:stop])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it (on its own device, whatever the backend needs)."""
    if not is_distributed():
        return tensor
    where = communication_device()
    moved = tensor if tensor.device == where else tensor.to(where)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order (first dimensions may differ)."""
    if not is_distributed():
        return tensor
    where = communication_device()
    local = tensor.to(where).contiguous()
    if local.dtype in (torch.bfloat16, torch.float16):
        # Gathering only moves bytes: send 16-bit floats as raw bytes, which every backend (gloo included) carries.
        return all_gather_concat(local.view(torch.uint8)).view(local.dtype).to(tensor.device)
    sizes = torch.zeros(world_size(), dtype=torch.int64, device=where)
    sizes[rank()] = local.shape[0]
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM)
    longest = int(sizes.max())
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=where)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    parts = [part[: int(n)] for part, n in zip(gathered, sizes.tolist())]
    return torch.cat(parts).to(tensor.device)


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's (picklable, small) ``value``, in rank order."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (picklable, small)."""
    if not is_distributed():
        return value
    box = [value if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=communication_device() if dist.get_backend() == "nccl"
                               else None)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor | None, src: int, *, shape: Sequence[int], dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """``tensor`` (given on rank ``src``, of ``shape``/``dtype``) on every rank, placed on ``device``."""
    if not is_distributed():
        assert tensor is not None
        return tensor.to(device)
    where = communication_device()
    if rank() == src:
        assert tensor is not None, "the source rank gives the tensor"
        buffer = tensor.to(device=where, dtype=dtype).contiguous()
    else:
        buffer = torch.empty(tuple(shape), dtype=dtype, device=where)
    dist.broadcast(buffer, src=src)
    return buffer.to(device)


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def main_decides(decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 only and hand its result to every rank.

    An FmaskError on rank 0 (a refused lock, an unwritable output) is raised on every rank with the same line,
    so no rank is left waiting in a collective for a process that gave up.
    """
    if not is_distributed():
        return decide()
    outcome: tuple[bool, Any]
    if is_main():
        try:
            outcome = (True, decide())
        except FmaskError as exc:
            outcome = (False, str(exc))
    else:
        outcome = (True, None)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise FmaskError(value)
    return value

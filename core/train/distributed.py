"""Data-parallel runs under ``torchrun`` (torch.distributed): the plumbing in one place.

``torchrun --nproc-per-node N -m core train|prune ...`` starts N copies of the command with
RANK, WORLD_SIZE and LOCAL_RANK in their environment. `launched` joins them into one process
group (gloo on the CPU, nccl on CUDA, each rank on GPU LOCAL_RANK) with a timeout, so a rank
whose peer hangs fails instead of waiting for ever; without those variables (or with
WORLD_SIZE 1) nothing here does anything and a run is the single-process run, unchanged.

What the rest of the engine calls:

- `is_main` (rank 0 writes checkpoints, records and progress), `active`, `rank`, `world_size`;
- `wrap` a model in DistributedDataParallel for the training forward passes (the loop keeps the
  plain module for everything else), `sync_from_main` to give every rank rank 0's weights and
  buffers (BatchNorm statistics drift apart under DDP) before a validation;
- `training_sampler`: each rank's share of every epoch's seeded draw (`set_epoch`);
- `evaluation_rows` and `reduce_sum`: a split cut in whole batches across the ranks, never
  padded, and the confusion matrices summed, so the metrics equal a single-process evaluation;
- `on_main`: run something on rank 0 only (the scoring network and the pruning decision, a
  save) and hand its result (or its error) to every rank.

Batch size is per process: the effective batch of one step is world size x batch.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterator, Sized
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler

from core.errors import DefectPruneError

T = TypeVar("T")
TIMEOUT_ENV = "DEFECTPRUNE_DIST_TIMEOUT"  # seconds a rank waits for its peers (default below)
DEFAULT_TIMEOUT_S = 1800.0  # longer than any rank-0-only phase (a scoring network, a latency run)


class DistributedRunError(DefectPruneError):
    """A data-parallel run that cannot go on: a peer process died or timed out, or rank 0
    failed in a phase only it runs."""


def requested_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedRunError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from None


def active() -> bool:
    """Whether this process is one rank of a data-parallel run of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedRunError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds") from None
    if not seconds > 0:
        raise DistributedRunError(f"{TIMEOUT_ENV}={text!r} must be above 0 seconds")
    return datetime.timedelta(seconds=seconds)


def _wants_cuda(device: str) -> bool:
    key = str(device).strip().lower()
    return key.startswith("cuda") or (key == "auto" and torch.cuda.is_available())


def _peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.distributed saying a peer went away or a collective timed out."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if not isinstance(exc, RuntimeError) or isinstance(exc, DefectPruneError):
        return False
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                                         "timeout", "broken pipe", "socket"))


@contextlib.contextmanager
def launched(device: str = "auto") -> Iterator[None]:
    """The process group of a torchrun launch for the block (nothing outside torchrun): gloo on
    the CPU, nccl when the run's device is CUDA (each rank on GPU LOCAL_RANK), with the
    `TIMEOUT_ENV` timeout. A peer that dies or times out becomes one `DistributedRunError`."""
    if requested_world_size() <= 1 or not dist.is_available():
        yield
        return
    cuda = _wants_cuda(device)
    backend = "nccl" if cuda else "gloo"
    try:
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend, timeout=_timeout())
    except (RuntimeError, ValueError) as exc:  # WORLD_SIZE set by something other than torchrun, a bad GPU index
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DistributedRunError(
            f"WORLD_SIZE={requested_world_size()} asks for a data-parallel run, but its {backend} process group "
            f"did not start ({first}); launch with torchrun, or unset WORLD_SIZE for one process") from None
    failed = False
    try:
        yield
    except Exception as exc:  # a dead or hung peer ends every rank with one line, not a traceback each
        failed = True
        if _peer_failure(exc):
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DistributedRunError(
                f"rank {dist.get_rank()} of {dist.get_world_size()}: another process of this run failed or did not "
                f"answer within {_timeout().total_seconds():g} s ({first}); only finished rounds and complete "
                "checkpoints were written: run the same command again to resume") from None
        raise
    finally:
        if not failed:  # after a failure the group may no longer answer: exit without a goodbye
            dist.destroy_process_group()


def describe(batch_size: int) -> dict[str, Any]:
    """What a training record says of the run's data parallelism: nothing in a single process
    (its record unchanged), else the world size and the effective batch (world size x batch)."""
    if not active():
        return {}
    return {"data_parallel": {"world_size": world_size(), "backend": dist.get_backend(),
                              "batch_size_per_process": int(batch_size),
                              "effective_batch_size": world_size() * int(batch_size)}}


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The block on rank 0 first, then on the other ranks (a dataset generated or indexed into
    its cache once, not by every rank at the same time); a plain block without torchrun."""
    if not active():
        yield
        return
    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()


# ---------------------------------------------------------------- models
def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel in a data-parallel run (its gradients averaged over
    the ranks; rank 0's weights given to all when wrapped); ``model`` itself otherwise. Wrap
    again after every cut: DDP holds the parameters it was built on."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def sync_from_main(model: nn.Module) -> None:
    """Every rank's ``model`` takes rank 0's parameters and buffers (in place)."""
    if not active():
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_contiguous():
                dist.broadcast(tensor, src=0)
            else:  # a channels_last weight: sent in the standard layout, copied back into its own
                plain = tensor.contiguous()
                dist.broadcast(plain, src=0)
                tensor.copy_(plain)


# ---------------------------------------------------------------- data
class ShardedDrawSampler(Sampler[int]):
    """This rank's share of one seeded draw per epoch over the whole dataset: a permutation, or
    ``weights``-proportional draws with replacement (the defect-favouring sampler). The draw is
    seeded by (seed, epoch) (`set_epoch`), the same on every rank, padded to a multiple of the
    world size as DistributedSampler pads, and rank r takes every world-size-th index from r."""

    def __init__(self, size: int, seed: int, weights: np.ndarray | None = None, replicas: int | None = None,
                 rank_: int | None = None):
        self.size, self.seed = int(size), int(seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.replicas = world_size() if replicas is None else int(replicas)
        self.rank = rank() if rank_ is None else int(rank_)
        self.per_rank = math.ceil(self.size / self.replicas)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draw(self) -> list[int]:
        """The whole epoch's draw, every rank's shares interleaved."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        total = self.per_rank * self.replicas
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator).tolist()
            order += order[: total - len(order)]  # padding repeats the first images, as DistributedSampler does
        else:
            order = torch.multinomial(self.weights, total, replacement=True, generator=generator).tolist()
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.draw()[self.rank::self.replicas])

    def __len__(self) -> int:
        return self.per_rank


def training_sampler(size: int, seed: int, weights: np.ndarray | None) -> ShardedDrawSampler | None:
    """The training loader's sampler in a data-parallel run (None otherwise: the single-process
    loader is left as it is)."""
    return ShardedDrawSampler(size, seed, weights) if active() else None


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ShardedDrawSampler):
        sampler.set_epoch(epoch)


def evaluation_rows(dataset: Sized, batch_size: int, replicas: int | None = None,
                    rank_: int | None = None) -> list[int]:
    """This rank's rows of a split: the single-process evaluation's batches (consecutive runs of
    ``batch_size`` rows) dealt out in turn, batch k to rank k mod world size. No row is padded
    or repeated, so the ranks' confusion matrices sum to the whole split's, and every batch is
    the one a single process runs."""
    replicas = world_size() if replicas is None else int(replicas)
    rank_ = rank() if rank_ is None else int(rank_)
    length = len(dataset)
    return [i for start in range(rank_ * batch_size, length, replicas * batch_size)
            for i in range(start, min(start + batch_size, length))]


def reduce_sum(values: np.ndarray) -> np.ndarray:
    """``values`` summed over the ranks (int64 or float64 kept), on every rank."""
    if not active():
        return values
    array = np.ascontiguousarray(values)
    tensor = torch.from_numpy(array.copy())
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy().astype(array.dtype, copy=False)


# ---------------------------------------------------------------- decisions made once
def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (pickled by torch.distributed between the processes of
    one run, never read from a file)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(work: Callable[[], T]) -> T:
    """``work()`` on rank 0 only, its result handed to every rank; when it raises, rank 0
    raises it and the other ranks a `DistributedRunError` quoting it (they would otherwise
    wait for an answer that never comes). Without a data-parallel run: ``work()``."""
    if not active():
        return work()
    if is_main():
        try:
            result = work()
        except BaseException as exc:
            broadcast_object(("error", f"{type(exc).__name__}: {exc}"))
            raise
        broadcast_object(("ok", result))
        return result
    status, payload = broadcast_object(None)
    if status == "error":
        raise DistributedRunError(f"rank 0 failed, so rank {rank()} stops too: {payload}")
    return payload

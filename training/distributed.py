"""Multi-process (data-parallel) training with torch.distributed, started by torchrun.

    torchrun --nproc_per_node N -m training.cli train --config configs/emoji.yaml

Each process (rank) embeds a disjoint slice of every global batch of
`data.batch_size` images. The Proxy Anchor loss is not a sum over samples:
each proxy's positive and negative terms are logsumexps over the whole batch,
so the mean of per-rank losses is not the loss of the global batch. Instead,
every rank all-gathers the embeddings, uncertainty embeddings and labels of
the global batch and computes the one global-batch loss. The gather is
differentiable (`_GatherRows`), and its backward sums the gradients that the
W identical rank losses send to a rank's own rows, so each rank's local
gradient is W times its share. DDP's averaging over W ranks then gives
exactly the single-process gradient, for the model and for the proxies.
The proxies are parameters replicated on every rank.

Input-space mixup pairs every image with a partner drawn from a permutation
of the global batch, so the ranks all-gather the uint8 images of the step and
each rank mixes its own rows with their partners. The mixing weight and the
permutation come from a generator seeded identically on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from training.data.loader import PREFETCH_BATCHES, MPerClassSampler, init_worker

logger = logging.getLogger(__name__)

# Rank 0 validates alone while the other ranks wait in their next collective, so the
# timeout must cover a whole validation pass. torch's default for gloo is 30 minutes.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the process group."""

    rank: int  # 0 .. world_size - 1; rank 0 writes checkpoints, logs and metrics and validates
    world_size: int  # number of training processes
    local_rank: int  # rank on this machine; selects the GPU on CUDA
    device: torch.device  # where this rank's model and batches live

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} must be an integer") from None


@contextlib.contextmanager
def process_group(device: str) -> Iterator[DistributedContext | None]:
    """Join the process group that torchrun describes, or yield None for a single process.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
    Without WORLD_SIZE, or with WORLD_SIZE=1, training runs in one process.
    The backend is NCCL when `device` is a CUDA device (this rank uses GPU
    LOCAL_RANK) and gloo otherwise. A process group that the caller has
    already initialised is used as it is and left open; one opened here is
    destroyed on exit.

    Raises:
        ValueError: a torchrun variable that is not an integer, or a CUDA device
            without CUDA.
    """
    owns_group = False
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        rank = dist.get_rank()
        local_rank = _env_int("LOCAL_RANK") or 0
    else:
        world_size = _env_int("WORLD_SIZE") or 1
        if world_size <= 1:
            yield None
            return
        rank = _env_int("RANK") or 0
        local_rank = _env_int("LOCAL_RANK") or 0

    device_type = torch.device(device).type
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"run.device={device!r} but CUDA is not available; use run.device=cpu")
        # Every "cuda" tensor of this process then goes to GPU local_rank.
        torch.cuda.set_device(local_rank)
        rank_device = torch.device("cuda", local_rank)
    else:
        rank_device = torch.device(device)

    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
        owns_group = True
        logger.info("joined the %s process group as rank %d of %d", backend, rank, world_size)
    try:
        yield DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=rank_device)
    except BaseException:
        if owns_group:  # no barrier: the other ranks may never reach it
            dist.destroy_process_group()
        raise
    if owns_group:
        _destroy_group()


def _destroy_group() -> None:
    """Tear the process group down after a normal end, once every rank has reached this point.

    Without the barrier, a rank that finishes first can destroy the group
    while gloo's threads in another rank still serve a collective. That
    process then aborts at exit (SIGABRT, "terminate called without an active
    exception"), as the two-process test did once under a full test run.
    Call it only when every rank ends normally; after an error the barrier
    would wait for a rank that never comes.
    """
    dist.barrier()
    dist.destroy_process_group()


# Batches split across ranks ----------------------------------------------------


class BatchShards:
    """Split of a global batch's rows over processes; this base class is the single process.

    `compute_loss` calls these methods, so the same code computes the loss
    in one process and in W processes.
    """

    world_size = 1
    rank = 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (n, ...) rows in rank order, differentiably: (W n, ...)."""
        return tensor

    def gather_constant(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like `gather`, without a gradient (labels, uint8 images)."""
        return tensor

    def local_rows(self, global_size: int) -> slice:
        """Rows of the global batch (of `global_size` rows) that this rank holds."""
        return slice(0, global_size)


SINGLE_PROCESS = BatchShards()


class _GatherRows(torch.autograd.Function):
    """All-gather (n, ...) rows of every rank into (W n, ...), with the gradient of the sum of rank losses.

    Backward all-reduces the gradient of the gathered tensor and returns
    this rank's rows: the gradient of sum_s L_s with respect to its input.
    torch.distributed.nn.functional.all_gather does the same but is
    deprecated in torch 2.13, which names only a private replacement.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows = slice(rank * tensor.shape[0], (rank + 1) * tensor.shape[0])
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows]


class GatheredBatch(BatchShards):
    """Equal slices of the global batch on the ranks of the default process group, in rank order."""

    def __init__(self, context: DistributedContext):
        self.world_size = context.world_size
        self.rank = context.rank

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return _GatherRows.apply(tensor)

    def gather_constant(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    def local_rows(self, global_size: int) -> slice:
        if global_size % self.world_size:
            raise ValueError(f"a global batch of {global_size} rows does not split over {self.world_size} ranks")
        size = global_size // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)


# Data ------------------------------------------------------------------------


class ShardedBatchSampler(Sampler[list[int]]):
    """Yield this rank's contiguous slice of each global batch that `batch_sampler` draws.

    Every rank builds the same `batch_sampler` with the same seed, so all
    ranks draw the same global batches, and rank r takes rows
    [r k, (r + 1) k) of each, with k = batch size / world size. Concatenated
    in rank order, the slices are the global batch in its original order.
    """

    def __init__(self, batch_sampler: Sampler[list[int]] | BatchSampler, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            if len(batch) % self.world_size:
                raise ValueError(
                    f"a batch of {len(batch)} images does not split over {self.world_size} ranks"
                )
            size = len(batch) // self.world_size
            yield list(batch[self.rank * size : (self.rank + 1) * size])


def rank_seed(seed: int, rank: int) -> int:
    """Derive a 63-bit seed for `rank` from `seed` with numpy's SeedSequence."""
    state = np.random.SeedSequence([seed % 2**63, rank]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & (2**63 - 1)


def init_rank_worker(rank: int, worker_id: int) -> None:
    """Worker init of a sharded loader: rank 0 keeps DataLoader's seed, other ranks derive their own.

    Every rank draws the same worker base seed from the shared loader
    generator, so without this worker k of every rank would repeat the
    same augmentation draws on different images.
    """
    if rank:
        torch.manual_seed(rank_seed(torch.initial_seed(), rank))
    init_worker(worker_id)


def fork_rng_for_rank(context: DistributedContext | None) -> None:
    """Give ranks other than 0 their own torch and numpy global random streams.

    Augmentation in the main process (data.num_workers=0) draws from torch's
    global generator. Rank 0 keeps the stream a single process would have;
    rank r > 0 reseeds from a draw of the current stream and r, so the
    result is deterministic for a given seed or checkpoint.
    """
    if context is None or context.is_main:
        return
    base = int(torch.randint(0, 2**62, ()).item())
    seed = rank_seed(base, context.rank)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def make_sharded_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    context: DistributedContext,
    workers: int = 2,
    seed: int = 0,
    m_per_class: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Training loader of one rank: its slice of the global batches a single-process loader would draw.

    `batch_size` is the global batch. With `m_per_class`, the global batches
    come from an MPerClassSampler. Otherwise a RandomSampler on the loader's
    generator draws them and the last incomplete batch is dropped, as in
    `training.data.loader.make_loader(shuffle=True)`. Reseeding
    `loader.generator` and calling `loader.batch_sampler.set_epoch` work as
    for that loader.

    Raises:
        ValueError: `batch_size` is not a multiple of the world size, or `workers` < 0.
    """
    world_size = context.world_size
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(
            f"data.batch_size={batch_size} must be a multiple of the {world_size} training processes; "
            f"set data.batch_size to a multiple of {world_size} or change --nproc_per_node"
        )
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    global_batches: Sampler[list[int]] | BatchSampler
    if m_per_class is not None:
        global_batches = MPerClassSampler(dataset.labels, batch_size, m_per_class, seed=seed)
    else:
        global_batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=True)
    options: dict[str, Any] = {
        "num_workers": workers,
        "generator": generator,
        "pin_memory": pin_memory,
        "worker_init_fn": functools.partial(init_rank_worker, context.rank) if workers > 0 else None,
    }
    if workers > 0:
        options["persistent_workers"] = True
        options["prefetch_factor"] = PREFETCH_BATCHES
    sampler = ShardedBatchSampler(global_batches, context.rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, **options)


# Gradient synchronisation -------------------------------------------------------


class _TrainStep(nn.Module):
    """The model and the loss module (with its proxies) as one module for DDP to synchronise.

    DDP needs the step's computation to run inside its forward, because that
    is where it prepares the gradient reduction and finds unused parameters
    from the outputs. `forward` runs the closure it is given.
    """

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, compute: Callable[[], Any]) -> Any:
        return compute()


class DistributedTraining:
    """DDP over the model and the loss module, rebuilt when the set of trainable parameters changes.

    DDP reduces the parameters that required a gradient when it was built.
    The warm-up freezes the backbone (`requires_grad=False`) and later
    unfreezes it, so `step` builds a new DDP wrapper when that set differs
    from the last one. Building it broadcasts rank 0's parameters and
    buffers, which are already equal on every rank.
    """

    def __init__(self, context: DistributedContext, *, find_unused_parameters: bool):
        self.context = context
        self.shards = GatheredBatch(context)
        self.find_unused_parameters = find_unused_parameters
        self._ddp: DistributedDataParallel | None = None
        self._trainable: tuple[bool, ...] | None = None

    def step(self, model: nn.Module, loss: nn.Module, compute: Callable[[], T]) -> T:
        """Run `compute` (which must use `self.shards`) inside DDP's forward and return its output."""
        module = self._ddp.module if self._ddp is not None else None
        trainable = tuple(parameter.requires_grad for parameter in (*model.parameters(), *loss.parameters()))
        if (
            self._ddp is None or trainable != self._trainable
            or module.model is not model or module.loss is not loss
        ):
            self._wrap(model, loss)
            self._trainable = trainable
        return self._ddp(compute)

    def _wrap(self, model: nn.Module, loss: nn.Module) -> None:
        if self._ddp is not None:
            # Free the old reducer first, so that only one reducer's hooks act on these parameters.
            self._ddp = None
            gc.collect()
        device = self.context.device
        device_ids = [device.index] if device.type == "cuda" else None
        self._ddp = DistributedDataParallel(
            _TrainStep(model, loss), device_ids=device_ids,
            find_unused_parameters=self.find_unused_parameters,
        )
        trainable = sum(parameter.numel() for parameter in self._ddp.parameters() if parameter.requires_grad)
        logger.info("DDP over %d processes reduces %d trainable parameters", self.context.world_size, trainable)


def uses_every_parameter(loss_name: str) -> bool:
    """Tell whether loss `loss_name` reaches every parameter; the cosine losses leave the uncertainty head unused."""
    return loss_name not in ("proxy_anchor", "proxy_anchor_mixup")


def broadcast_from_main(context: DistributedContext | None, value: T) -> T:
    """Rank 0's `value` on every rank (a picklable object); `value` itself in a single process."""
    if context is None:
        return value
    holder: list[Any] = [value if context.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


"""Data-parallel calibration on torch.distributed: each rank runs its share of the calibration
batches, then the statistics are combined so that every rank holds the same ones.

Launch N processes with `torchrun --nproc-per-node N -m ptqkit quantize ...` (or call
`pq.quantize(..., distributed=True)` in a script started by torchrun). ptqkit does not build a
cluster framework: it uses the default process group (gloo on CPU, nccl on GPUs).

How the work is split and combined:
- The first `samples` calibration samples, in `batch_size` batches, are numbered as one process
  would run them; rank r takes a contiguous range of whole batches (`shard_ranges`). Every batch
  is therefore the very same tensor it is in one process.
- Observer states (`Observer.state`) and block statistics (`InputStatistics.state`) are gathered
  from every rank and merged in rank order, so the merge equals one pass over the batches in
  their single-process order, and every rank computes the same bytes.
- Min-max ranges and histograms (counts of samples in power-of-two bins) merge exactly: the
  result is byte-identical to one process. Sums (AWQ's mean |x|, GPTQ's Gram sums) are float64
  sums of float32 values, added in another order than one process adds them; they are used in
  float32, so they equal one process's except where a value sits on a float32 rounding
  boundary (tests/integration/test_distributed_real_models.py compares SmolLM2 GPTQ int4 on 2
  ranks with one process).

The gathered objects are plain tensors and ints, exchanged with `all_gather_object` between the
ranks of one job (never read from a file).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ptqkit.core.errors import ConfigError

__all__ = ["DataParallel", "shard_ranges", "init_from_environment"]

logger = logging.getLogger(__name__)


def shard_ranges(total_batches: int, world_size: int) -> list[range]:
    """Contiguous batch ranges, one per rank, sizes differing by at most one (earlier ranks
    take the extra batches)."""
    base, extra = divmod(total_batches, world_size)
    ranges, start = [], 0
    for rank in range(world_size):
        stop = start + base + (1 if rank < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def init_from_environment(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) if it is not initialised yet. Returns whether a group exists.
    `backend` defaults to nccl when CUDA is available, else gloo."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=chosen)
    logger.info("process group initialised: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), chosen)
    return True


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the default process group, and the collectives calibration uses."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> DataParallel:
        """The default process group (initialised from torchrun's environment if needed)."""
        if not init_from_environment():
            raise ConfigError(
                "distributed=True needs a torch.distributed process group: launch with "
                "`torchrun --nproc-per-node N ...` (it sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), or call "
                "torch.distributed.init_process_group first"
            )
        import torch.distributed as dist

        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes files (rank 0)."""
        return self.rank == 0

    def my_batches(self, total_batches: int) -> range:
        """The calibration batch numbers this rank runs."""
        if total_batches < self.world_size:
            raise ConfigError(
                f"calibration has {total_batches} batch(es) for {self.world_size} ranks: every rank needs at least "
                f"one; use more samples or a smaller calibration batch_size (at most "
                f"samples / {self.world_size})"
            )
        return shard_ranges(total_batches, self.world_size)[self.rank]

    def shard(self, batches: Iterable[Any], max_samples: int, total_batches: int) -> Iterator[Any]:
        """This rank's batches among those holding the first `max_samples` samples."""
        from ptqkit.stats.hooks import limited_batches

        mine = self.my_batches(total_batches)
        for index, (batch, _) in enumerate(limited_batches(batches, max_samples)):
            if index >= mine.stop:
                return
            if index >= mine.start:
                yield batch

    def gather(self, value: Any) -> list[Any]:
        """`value` from every rank, in rank order."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def merge_observers(self, observers: Mapping[str, Any]) -> dict[str, Any]:
        """The observers of every rank merged in rank order (the same on every rank)."""
        from ptqkit.observers import observer_from_state

        states = self.gather({name: observer.state() for name, observer in observers.items()})
        return {name: _merged([rank_states[name] for rank_states in states], lambda state: observer_from_state(*state)) for name in observers}

    def merge_statistics(self, stats: Mapping[str, Any]) -> dict[str, Any]:
        """Block statistics (`InputStatistics`) of every rank merged in rank order. Names that
        share one statistics object (q/k/v reading one input) still share the merged one."""
        from ptqkit.stats.input_stats import InputStatistics

        leaders = {id(s): name for name, s in reversed(list(stats.items()))}  # first name of each object
        local = {name: stats[name] for name in leaders.values()}
        states = self.gather({name: s.state() for name, s in local.items()})
        for rank, rank_states in enumerate(states):
            if set(rank_states) != set(states[0]):
                differ = sorted(set(rank_states) ^ set(states[0]))
                raise ConfigError(
                    f"rank {rank} and rank 0 saw different layers called on their calibration batches: {differ}; "
                    "every rank's batches must reach the same layers"
                )
        merged = {
            name: _merged(
                [rank_states[name] for rank_states in states],
                lambda state, own=own: InputStatistics.from_state(own.channels, own.request, own.name, state),
            )
            for name, own in local.items()
        }
        return {name: merged[leaders[id(s)]] for name, s in stats.items()}


def _merged(states: list[Any], rebuild: Callable[[Any], Any]) -> Any:
    """The object rebuilt from rank 0's state with every later rank's merged in (`merge_`), in
    rank order: the same bytes on every rank."""
    combined = rebuild(states[0])
    for state in states[1:]:
        combined.merge_(rebuild(state))
    return combined

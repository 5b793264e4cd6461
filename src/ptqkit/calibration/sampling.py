"""Deterministic choice of which calibration samples to use.

Pure functions over sample *indices*: the samples themselves are never touched, so callers
materialize only the ones chosen. Every random choice comes from a `torch.Generator` seeded with
the caller's `seed`, so the same inputs and seed always give the same indices on every platform.

- `select_indices`: all samples, or a uniform random subset of `limit` of them.
- `stratified_indices`: a subset that keeps the class proportions of `labels`, with each class's
  share rounded by the largest-remainder (Hamilton) method.
- `reservoir_sample`: a uniform random subset of a stream of unknown length in O(limit) memory
  (Algorithm R).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Any, Hashable, Iterable, Iterator, Sequence, TypeVar

import torch

from ptqkit.core.errors import CalibrationDataError, ConfigError

__all__ = [
    "check_limit",
    "check_seed",
    "class_shares",
    "select_indices",
    "stratified_indices",
    "reservoir_sample",
    "normalize_labels",
    "warn_if_short",
    "take",
    "choose",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def check_limit(limit: Any, where: str = "limit") -> int | None:
    """Validate a sample limit: None (use everything) or a positive integer."""
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigError(
            f"{where}={limit!r} is not valid: use None (all samples) or a positive integer"
        )
    return limit


def check_seed(seed: Any, where: str = "seed") -> int:
    """Validate a sampling seed: any integer (bools are rejected)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}={seed!r} is not valid: the sampling seed must be an integer")
    return seed


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def warn_if_short(available: int, limit: int | None, what: str) -> None:
    """Log a warning when fewer samples than `limit` exist (the caller then uses them all)."""
    if limit is not None and available < limit:
        logger.warning(
            "%s: %d calibration samples requested (limit) but only %d available; using all %d",
            what,
            limit,
            available,
            available,
        )


def select_indices(available: int, limit: int | None, seed: int) -> list[int]:
    """Indices (ascending) of the samples to use out of `available`.

    With `limit` None or >= `available`: all of them, in order. Otherwise a uniform random subset
    of size `limit`: the first `limit` entries of `torch.randperm(available)` under `seed`,
    returned sorted so that samples keep their source order.
    """
    if limit is None or limit >= available:
        return list(range(available))
    perm = torch.randperm(available, generator=_generator(seed))  # [available]
    return sorted(perm[:limit].tolist())


def class_shares(counts: Sequence[int], limit: int) -> list[int]:
    """How many samples each class gets out of `limit`, proportional to `counts`.

    Largest-remainder (Hamilton) rounding in exact integer arithmetic: class c's quota is
    limit * counts[c] / total; every class first gets floor(quota), then the samples still
    missing go one each to the classes with the largest fractional remainders, ties broken by
    class order. Every share is therefore floor or ceil of its quota, and the shares sum to
    `limit` (requires limit <= total). A class whose quota is below 1 may get 0 samples.
    """
    total = sum(counts)
    if not 0 < limit <= total:
        raise ValueError(f"limit {limit} must lie in 1..{total}")
    floors = [limit * n // total for n in counts]
    remainders = [limit * n % total for n in counts]
    missing = limit - sum(floors)
    order = sorted(range(len(counts)), key=lambda c: (-remainders[c], c))
    for c in order[:missing]:
        floors[c] += 1
    return floors


def _label_key(label: Any) -> Hashable:
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise CalibrationDataError(
                f"stratify_by: a label is a tensor of shape {tuple(label.shape)}; each sample needs one scalar label"
            )
        return label.item()
    return label


def normalize_labels(labels: Any, available: int, where: str = "stratify_by") -> list[Hashable]:
    """Per-sample labels as a list of hashable scalars, checked to have one per sample."""
    if isinstance(labels, torch.Tensor):
        if labels.ndim != 1:
            raise CalibrationDataError(
                f"{where}: labels tensor has shape {tuple(labels.shape)}; expected 1-D with one label per sample ({available})"
            )
        values: list[Any] = labels.tolist()
    elif isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise CalibrationDataError(
            f"{where}: {type(labels).__name__} is not a sequence of per-sample labels; pass a list or 1-D tensor"
        )
    else:
        values = [_label_key(v) for v in labels]
    if len(values) != available:
        raise CalibrationDataError(
            f"{where}: {len(values)} labels for {available} samples; give exactly one label per sample"
        )
    for i, v in enumerate(values):
        try:
            hash(v)
        except TypeError:
            raise CalibrationDataError(
                f"{where}: label {i} ({v!r}) is not hashable; use ints or strings"
            ) from None
    return values


def stratified_indices(
    labels: Sequence[Hashable], limit: int | None, seed: int
) -> tuple[list[int], dict[str, int]]:
    """Indices (ascending) of a class-proportional subset, and the count taken from each class.

    Classes are ordered by first appearance in `labels`; `class_shares` decides each class's
    share, then each class draws its share uniformly at random (one generator, seeded once,
    drawing class by class in that order). With `limit` None or >= len(labels) every sample is
    used. The returned counts are keyed by `str(label)` so they are JSON-able.
    """
    counts = Counter(labels)
    classes = list(counts)  # first-appearance order (Counter keeps insertion order)
    if limit is None or limit >= len(labels):
        return list(range(len(labels))), {str(c): counts[c] for c in classes}
    members: dict[Hashable, list[int]] = {c: [] for c in classes}
    for i, label in enumerate(labels):
        members[label].append(i)
    shares = class_shares([counts[c] for c in classes], limit)
    gen = _generator(seed)
    chosen: list[int] = []
    for c, share in zip(classes, shares):
        pool = members[c]
        perm = torch.randperm(len(pool), generator=gen)  # [len(pool)]
        chosen.extend(pool[j] for j in perm[:share].tolist())
    return sorted(chosen), {str(c): s for c, s in zip(classes, shares)}


def reservoir_sample(stream: Iterable[T], limit: int, seed: int) -> tuple[list[tuple[int, T]], int]:
    """A uniform random subset of `limit` items from a stream, in O(limit) memory (Algorithm R).

    Returns the chosen (stream index, item) pairs in stream order and the number of items read.
    Item i >= limit replaces a random reservoir slot j when j = randint(0, i) < limit, which
    keeps every item in the reservoir with probability limit / n after n items.
    """
    gen = _generator(seed)
    reservoir: list[tuple[int, T]] = []
    seen = 0
    for i, item in enumerate(stream):
        seen = i + 1
        if i < limit:
            reservoir.append((i, item))
            continue
        j = int(torch.randint(0, i + 1, (1,), generator=gen).item())
        if j < limit:
            reservoir[j] = (i, item)
    reservoir.sort(key=lambda pair: pair[0])
    return reservoir, seen


def take(stream: Iterable[T], limit: int | None) -> Iterator[tuple[int, T]]:
    """(index, item) for the first `limit` items of a stream; reads nothing beyond them."""
    return enumerate(itertools.islice(stream, limit))  # islice stops without pulling item `limit`


def choose(
    available: int, limit: int | None, seed: int, strata: Sequence[Hashable] | None
) -> tuple[list[int], dict[str, Any]]:
    """Indices to use and a JSON-able sampling description (method, classes, available, limit, seed).

    With `strata` (one label per sample): `stratified_indices`; otherwise `select_indices`.
    Logs a warning when `limit` exceeds `available`.
    """
    warn_if_short(available, limit, "calibration sampling")
    info: dict[str, Any]
    if strata is not None:
        index, classes = stratified_indices(strata, limit, seed)
        info = {"method": "stratified" if len(index) < available else "all", "classes": classes}
    else:
        index = select_indices(available, limit, seed)
        info = {"method": "random" if len(index) < available else "all"}
    info.update(available=available, limit=limit, seed=seed)
    return index, info

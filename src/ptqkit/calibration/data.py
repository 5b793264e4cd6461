"""CalibrationData: the representative samples that calibration runs through the model.

Build one with a constructor that matches where the data lives:

- `from_tensors`: a Tensor [N, ...], a sequence of per-sample inputs, or a dict name -> [N, ...];
  optional per-sample `labels` and class-proportional (`stratify_by`) sampling.
- `from_iterable`: any iterable of samples, or of batches (a torch DataLoader yields batches).
- `from_text`: strings, a .txt file or a .jsonl file, tokenized with a Hugging Face tokenizer.
- `from_image_folder`: image files (optionally in class sub-folders) through a transform.

Sampling is deterministic: with `limit` below the number of samples available, a random subset
drawn with `torch.Generator().manual_seed(seed)` (see `ptqkit.calibration.sampling`), kept in
source order. Asking for more than exists logs a warning and uses everything.

The object is immutable: it holds private copies of its samples, and `batches()` returns freshly
stacked tensors. `fingerprint` hashes the exact samples used plus the preprocessing description
(not the file path, limit or seed: the same samples prepared the same way hash the same).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import torch

import ptqkit.calibration.sampling as sampling
from ptqkit.calibration.samples import (
    ModelInput,
    as_sample,
    call_model,
    clone_sample,
    collate,
    count_samples,
    describe_tensors,
    hash_samples,
    pick_samples,
    split_batch,
    validate_samples,
)
from ptqkit.core.errors import CalibrationDataError, ConfigError

__all__ = ["CalibrationData", "ModelInput", "call_model"]

logger = logging.getLogger(__name__)


def _check_batch_size(batch_size: Any, where: str = "batch_size") -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"{where}={batch_size!r} is not valid: use a positive integer")
    return batch_size


def _check_pad_id(pad_id: Any) -> int:
    if not isinstance(pad_id, int) or isinstance(pad_id, bool):
        raise ConfigError(f"pad_id={pad_id!r} is not valid: use an integer token id")
    return pad_id


class CalibrationData:
    """An immutable, validated set of calibration samples (each without a batch dimension).

    Prefer the `from_*` constructors; `__init__` takes already-chosen samples. Every sample is
    checked: the set must be non-empty, finite, and consistent in structure, dtype and shape
    (1-D integer token sequences may differ in length; `batches` pads them).
    """

    __slots__ = (
        "_samples",
        "_origins",
        "_labels",
        "_batch_size",
        "_pad_id",
        "_pad_values",
        "_description",
        "_fingerprint",
    )

    def __init__(
        self,
        samples: Sequence[Any],
        *,
        batch_size: int = 8,
        pad_id: int = 0,
        pad_values: Mapping[str, int] | None = None,
        labels: Sequence[Hashable] | None = None,
        origins: Sequence[str] | None = None,
        source: str = "samples",
        sampling_info: Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        copy: bool = True,
    ) -> None:
        batch_size = _check_batch_size(batch_size)
        pad_id = _check_pad_id(pad_id)
        pad_values = {"attention_mask": 0} if pad_values is None else dict(pad_values)
        origins = [f"sample {i}" for i in range(len(samples))] if origins is None else list(origins)
        if not samples:
            raise CalibrationDataError(
                f"calibration data is empty: {source} gave no samples; calibration needs at least one "
                "(the seeds recommend 100-500 representative samples)"
            )
        if len(origins) != len(samples) or (labels is not None and len(labels) != len(samples)):
            raise ValueError("origins and labels need one entry per sample")  # internal invariant
        owned = [as_sample(s, o, copy=copy) for s, o in zip(samples, origins)]
        validate_samples(owned, origins)
        samples_: tuple[ModelInput, ...] = tuple(owned)
        info = dict(
            sampling_info or {"method": "all", "available": len(owned), "limit": None, "seed": None}
        )
        prep = {
            **dict(preprocessing or {"kind": "tensors"}),
            "pad_id": pad_id,
            "pad_values": pad_values,
        }
        description = {
            "source": source,
            "count": len(owned),
            "limit": info.pop("limit", None),
            "seed": info.pop("seed", None),
            "sampling": info,
            "preprocessing": prep,
        }
        fields = {
            "_samples": samples_,
            "_origins": tuple(origins),
            "_labels": None if labels is None else tuple(labels),
            "_batch_size": batch_size,
            "_pad_id": pad_id,
            "_pad_values": pad_values,
            "_description": description,
            "_fingerprint": None,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"CalibrationData is immutable: cannot set {name!r}; build a new one")

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __setstate__(self, state: Mapping[str, Any]) -> None:  # pickle / copy.deepcopy
        for name, value in state.items():
            object.__setattr__(self, name, value)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_tensors(
        cls,
        data: Any,
        *,
        limit: int | None = None,
        seed: int = 0,
        labels: Any = None,
        stratify_by: Any = None,
        batch_size: int = 8,
        pad_id: int = 0,
    ) -> "CalibrationData":
        """Samples from in-memory tensors.

        `data`: a Tensor [N, ...] (row i is sample i), a sequence of per-sample inputs (Tensor,
        tuple of Tensors or dict), or a dict name -> Tensor [N, ...] (sample i is {name: t[i]}).
        `labels`: optional per-sample labels (sequence or 1-D tensor of length N), kept in
        `.labels`, never fed to the model. `stratify_by`: per-sample labels, or the string
        "labels" to use `labels`; the `limit` samples then keep the class proportions (shares
        rounded by largest remainder, see `sampling.class_shares`). Without it, a uniform random
        subset. Only the chosen rows are copied.
        """
        limit = sampling.check_limit(limit)
        seed = sampling.check_seed(seed)
        available = count_samples(data)
        label_list = (
            None if labels is None else sampling.normalize_labels(labels, available, "labels")
        )
        if isinstance(stratify_by, str):
            if stratify_by != "labels":
                raise ConfigError(
                    f"stratify_by={stratify_by!r} is not valid: use 'labels', a sequence of per-sample labels, or None"
                )
            if label_list is None:
                raise ConfigError(
                    "stratify_by='labels' needs labels=...: pass one label per sample"
                )
            strata = label_list
        else:
            strata = (
                None if stratify_by is None else sampling.normalize_labels(stratify_by, available)
            )
        index, info = sampling.choose(available, limit, seed, strata)
        samples, copy = pick_samples(data, index)
        return cls(
            samples,
            batch_size=batch_size,
            pad_id=pad_id,
            labels=None if label_list is None else [label_list[i] for i in index],
            origins=[f"sample {i}" for i in index],
            source=f"tensors: {describe_tensors(data)}",
            sampling_info=info,
            preprocessing={"kind": "tensors"},
            copy=copy,
        )

    @classmethod
    def from_iterable(
        cls,
        iterable: Iterable[Any],
        *,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        batched: bool | None = None,
        sample: bool = False,
        pad_id: int = 0,
    ) -> "CalibrationData":
        """Samples from an iterable of samples or of batches.

        `batched`: whether each item is a batch (first dimension = samples) to split; default
        (None): True for a torch DataLoader with automatic batching, False otherwise.
        `sample=False` (default): take the first `limit` samples and stop reading — nothing past
        them is pulled from the iterable (the batch holding the limit is split, no later batch is
        read). `sample=True`: read everything and keep a uniform random subset of `limit`
        (reservoir sampling, O(limit) memory, deterministic under `seed`).
        A Tensor or dict of Tensors is passed on to `from_tensors`.
        """
        if isinstance(iterable, (torch.Tensor, Mapping)):
            return cls.from_tensors(
                iterable, limit=limit, seed=seed, batch_size=batch_size, pad_id=pad_id
            )
        limit = sampling.check_limit(limit)
        seed = sampling.check_seed(seed)
        if batched is None:
            from torch.utils.data import DataLoader

            batched = isinstance(iterable, DataLoader) and iterable.batch_sampler is not None
        chosen, available, method = _read_samples(iterable, limit, seed, batched, sample)
        sampling.warn_if_short(len(chosen), limit, "from_iterable")
        name = type(iterable).__name__
        return cls(
            [s for _, s in chosen],
            batch_size=batch_size,
            pad_id=pad_id,
            origins=[f"sample {i}" for i, _ in chosen],
            source=f"iterable: {name}" + (" of batches" if batched else ""),
            sampling_info={
                "method": method,
                "available": available,
                "limit": limit,
                "seed": seed if method == "reservoir" else None,
            },
            preprocessing={"kind": "tensors"},
        )

    @classmethod
    def from_text(
        cls,
        source: str | os.PathLike[str] | Sequence[str],
        tokenizer: Any,
        *,
        max_length: int = 128,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        text_key: str = "text",
        split: str = "paragraph",
    ) -> "CalibrationData":
        """Tokenized text samples: dicts {input_ids, attention_mask} of 1-D int64 tensors.

        `source`: a list of strings (one sample each), a `.jsonl`/`.ndjson` file (one JSON object
        per line; the sample is its `text_key` field), or any other file read as UTF-8 plain
        text: with `split="paragraph"` (default) one sample per paragraph (blocks separated by
        blank lines, inner newlines kept), with `split="line"` one sample per non-empty line.
        Blank texts are skipped. `limit` picks a seeded random subset *before* tokenizing; each
        text is truncated to `max_length` tokens. `batches()` right-pads input_ids with the
        tokenizer's pad id (its eos id if it has none, else 0) and attention_mask with 0.
        """
        from ptqkit.calibration.text import prepare_text

        prepared = prepare_text(
            source,
            tokenizer,
            max_length=max_length,
            limit=sampling.check_limit(limit),
            seed=sampling.check_seed(seed),
            text_key=text_key,
            split=split,
        )
        return cls(**prepared, batch_size=batch_size, copy=False)

    @classmethod
    def from_image_folder(
        cls,
        path: str | os.PathLike[str],
        transform: Callable[[Any], torch.Tensor],
        *,
        limit: int | None = None,
        seed: int = 0,
        stratify_by_folder: bool = True,
        batch_size: int = 8,
        mode: str | None = "RGB",
    ) -> "CalibrationData":
        """Image samples: each file opened with PIL, converted to `mode`, passed to `transform`.

        Images directly in `path` form one class; each first-level sub-folder is a class (files
        found recursively inside it). Files are ordered by relative path. With `limit` below
        the number of images and `stratify_by_folder`, each class keeps its share (largest
        remainder); otherwise a seeded uniform subset. Only the chosen files are decoded.
        `transform` must return a Tensor (typically [C, H, W]); `.labels` holds the class
        folder names ("" for files at the top level).
        """
        from ptqkit.calibration.images import prepare_images

        prepared = prepare_images(
            path,
            transform,
            limit=sampling.check_limit(limit),
            seed=sampling.check_seed(seed),
            stratify_by_folder=stratify_by_folder,
            mode=mode,
        )
        return cls(**prepared, batch_size=batch_size, copy=False)

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> ModelInput:
        """A copy of sample `i` (no batch dimension)."""
        return clone_sample(self._samples[i])

    def __repr__(self) -> str:
        d = self._description
        return f"CalibrationData({d['count']} samples from {d['source']}, sampling={d['sampling']['method']})"

    @property
    def batch_size(self) -> int:
        """Default batch size of `batches()`."""
        return self._batch_size

    @property
    def labels(self) -> tuple[Hashable, ...] | None:
        """Per-sample labels (class folder names, or `labels=` given to from_tensors), or None."""
        return self._labels

    @property
    def origins(self) -> tuple[str, ...]:
        """Where each sample came from, e.g. 'sample 7 (line 12 of calib.jsonl)'."""
        return self._origins

    def batches(self, batch_size: int | None = None) -> Iterator[ModelInput]:
        """Batches in sample order: stacked tensors, 1-D token sequences right-padded per batch."""
        size = self._batch_size if batch_size is None else _check_batch_size(batch_size)
        for start in range(0, len(self._samples), size):
            yield collate(self._samples[start : start + size], self._pad_id, self._pad_values)

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) over the exact samples (bytes, dtype, shape, keys) + preprocessing description."""
        if self._fingerprint is None:
            fingerprint = hash_samples(self._samples, self._description["preprocessing"])
            object.__setattr__(self, "_fingerprint", fingerprint)  # computed once, on first use
        return self._fingerprint

    @property
    def description(self) -> dict[str, Any]:
        """JSON-able provenance: source, count, limit, seed, sampling, preprocessing (a copy)."""
        import copy

        return copy.deepcopy(self._description)


def _read_samples(
    iterable: Any, limit: int | None, seed: int, batched: bool, sample: bool
) -> tuple[list[tuple[int, Any]], int | None, str]:
    """((index, sample) pairs kept, how many were available when all were read, the sampling
    method) from an iterable of samples or of batches (`batched`: split each item)."""
    if not isinstance(iterable, Iterable):
        raise CalibrationDataError(
            f"from_iterable: {type(iterable).__name__} is not iterable; pass a DataLoader, list or generator of samples"
        )

    def stream() -> Iterator[Any]:
        for b, item in enumerate(iterable):
            if batched:
                yield from split_batch(item, f"batch {b}")
            else:
                yield item

    if sample and limit is not None:
        chosen, available = sampling.reservoir_sample(stream(), limit, seed)
        method = "reservoir" if available > limit else "all"
    else:
        chosen = list(sampling.take(stream(), limit))
        available = None
        method = "first" if limit is not None and len(chosen) == limit else "all"
    if not chosen:
        raise CalibrationDataError(
            f"calibration data is empty: the {type(iterable).__name__} yielded no samples"
        )
    return chosen, available, method

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
from torch import nn

from ptqkit.calibration import sampling
from ptqkit.calibration.samples import ModelInput, as_sample, collate, hash_samples, split_batch, validate_samples
from ptqkit.errors import CalibrationDataError, ConfigError

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


def _describe_tensors(data: Any) -> str:
    if isinstance(data, torch.Tensor):
        return f"Tensor{list(data.shape)} {data.dtype}"
    if isinstance(data, Mapping):
        return "dict(" + ", ".join(f"{k}: {list(v.shape)}" if isinstance(v, torch.Tensor) else str(k) for k, v in data.items()) + ")"
    return f"{type(data).__name__} of {len(data)} samples"


class CalibrationData:
    """An immutable, validated set of calibration samples (each without a batch dimension).

    Prefer the `from_*` constructors; `__init__` takes already-chosen samples. Every sample is
    checked: the set must be non-empty, finite, and consistent in structure, dtype and shape
    (1-D integer token sequences may differ in length; `batches` pads them).
    """

    __slots__ = ("_samples", "_origins", "_labels", "_batch_size", "_pad_id", "_pad_values",
                 "_description", "_fingerprint")

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
        self._samples: tuple[ModelInput, ...] = tuple(owned)
        self._origins = tuple(origins)
        self._labels = None if labels is None else tuple(labels)
        self._batch_size = batch_size
        self._pad_id = pad_id
        self._pad_values = pad_values
        info = dict(sampling_info or {"method": "all", "available": len(owned), "limit": None, "seed": None})
        prep = {**dict(preprocessing or {"kind": "tensors"}), "pad_id": pad_id, "pad_values": pad_values}
        self._description = {
            "source": source,
            "count": len(owned),
            "limit": info.pop("limit", None),
            "seed": info.pop("seed", None),
            "sampling": info,
            "preprocessing": prep,
        }
        self._fingerprint: str | None = None

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
        if isinstance(data, torch.Tensor):
            if data.ndim == 0:
                raise CalibrationDataError("from_tensors: data is a 0-d tensor; pass a Tensor [N, ...] with N samples")
            available = int(data.shape[0])
        elif isinstance(data, Mapping):
            if not data:
                raise CalibrationDataError("calibration data is empty: from_tensors got an empty dict")
            sizes = {}
            for k, v in data.items():
                if not isinstance(v, torch.Tensor) or v.ndim == 0:
                    raise CalibrationDataError(f"from_tensors: data[{k!r}] is {type(v).__name__}; a dict must map names to Tensors [N, ...]")
                sizes[k] = int(v.shape[0])
            if len(set(sizes.values())) > 1:
                raise CalibrationDataError(f"from_tensors: dict tensors have different sample counts {sizes}; all need the same N")
            available = next(iter(sizes.values()))
        elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            available = len(data)
        else:
            raise CalibrationDataError(
                f"from_tensors: data is a {type(data).__name__}; pass a Tensor [N, ...], a list of samples or a dict of Tensors"
            )
        if available == 0:
            raise CalibrationDataError(f"calibration data is empty: from_tensors got {_describe_tensors(data)}")
        label_list = None if labels is None else sampling.normalize_labels(labels, available, "labels")
        if isinstance(stratify_by, str):
            if stratify_by != "labels":
                raise ConfigError(f"stratify_by={stratify_by!r} is not valid: use 'labels', a sequence of per-sample labels, or None")
            if label_list is None:
                raise ConfigError("stratify_by='labels' needs labels=...: pass one label per sample")
            strata = label_list
        else:
            strata = None if stratify_by is None else sampling.normalize_labels(stratify_by, available)
        sampling.warn_if_short(available, limit, "from_tensors")
        if strata is not None:
            index, classes = sampling.stratified_indices(strata, limit, seed)
            info: dict[str, Any] = {"method": "stratified" if len(index) < available else "all", "classes": classes}
        else:
            index = sampling.select_indices(available, limit, seed)
            info = {"method": "random" if len(index) < available else "all"}
        info.update(available=available, limit=limit, seed=seed)
        picked = torch.tensor(index, dtype=torch.long)  # [k]
        if isinstance(data, torch.Tensor):
            samples: list[Any] = list(data.detach()[picked].unbind(0))  # [N, ...] -> k x [...]
            copy = False
        elif isinstance(data, Mapping):
            columns = {k: v.detach()[picked].unbind(0) for k, v in data.items()}  # [N, ...] -> k x [...]
            samples = [{k: columns[k][j] for k in columns} for j in range(len(index))]
            copy = False
        else:
            samples = [data[i] for i in index]
            copy = True
        return cls(
            samples,
            batch_size=batch_size,
            pad_id=pad_id,
            labels=None if label_list is None else [label_list[i] for i in index],
            origins=[f"sample {i}" for i in index],
            source=f"tensors: {_describe_tensors(data)}",
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
            return cls.from_tensors(iterable, limit=limit, seed=seed, batch_size=batch_size, pad_id=pad_id)
        limit = sampling.check_limit(limit)
        seed = sampling.check_seed(seed)
        if batched is None:
            from torch.utils.data import DataLoader

            batched = isinstance(iterable, DataLoader) and iterable.batch_sampler is not None
        if not isinstance(iterable, Iterable):
            raise CalibrationDataError(f"from_iterable: {type(iterable).__name__} is not iterable; pass a DataLoader, list or generator of samples")

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
            raise CalibrationDataError(f"calibration data is empty: the {type(iterable).__name__} yielded no samples")
        sampling.warn_if_short(len(chosen), limit, "from_iterable")
        name = type(iterable).__name__
        return cls(
            [s for _, s in chosen],
            batch_size=batch_size,
            pad_id=pad_id,
            origins=[f"sample {i}" for i, _ in chosen],
            source=f"iterable: {name}" + (" of batches" if batched else ""),
            sampling_info={"method": method, "available": available, "limit": limit, "seed": seed if method == "reservoir" else None},
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
        from ptqkit.calibration.text import read_texts, tokenize

        limit = sampling.check_limit(limit)
        seed = sampling.check_seed(seed)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ConfigError(f"max_length={max_length!r} is not valid: use a positive number of tokens")
        texts, source_name, reading = read_texts(source, text_key=text_key, split=split)
        if not texts:
            raise CalibrationDataError(f"calibration data is empty: {source_name} holds no non-blank text")
        sampling.warn_if_short(len(texts), limit, f"from_text({source_name})")
        index = sampling.select_indices(len(texts), limit, seed)
        chosen = [texts[i] for i in index]
        samples, pad_id, tokenizing = tokenize([t for t, _ in chosen], tokenizer, max_length=max_length)
        return cls(
            samples,
            batch_size=batch_size,
            pad_id=pad_id,
            pad_values={"attention_mask": 0},
            origins=[f"sample {i} ({where})" for i, (_, where) in zip(index, chosen)],
            source=f"text: {source_name}",
            sampling_info={"method": "random" if len(index) < len(texts) else "all", "available": len(texts), "limit": limit, "seed": seed},
            preprocessing={"kind": "text", **reading, **tokenizing},
            copy=False,
        )

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
        from ptqkit.calibration.images import describe_transform, list_images, load_image

        limit = sampling.check_limit(limit)
        seed = sampling.check_seed(seed)
        if not callable(transform):
            raise ConfigError(f"transform={transform!r} is not callable; pass a function PIL.Image -> Tensor [C, H, W]")
        files = list_images(path)
        labels = [label for _, label in files]
        sampling.warn_if_short(len(files), limit, f"from_image_folder({path})")
        if stratify_by_folder and len(set(labels)) > 1:
            index, classes = sampling.stratified_indices(labels, limit, seed)
            info: dict[str, Any] = {"method": "stratified" if len(index) < len(files) else "all", "classes": classes}
        else:
            index = sampling.select_indices(len(files), limit, seed)
            info = {"method": "random" if len(index) < len(files) else "all"}
        info.update(available=len(files), limit=limit, seed=seed)
        root = os.fspath(path)
        origins = [f"sample {i} ({os.path.relpath(files[i][0], root)})" for i in index]
        samples = [load_image(files[i][0], transform, mode, origin) for i, origin in zip(index, origins)]
        return cls(
            samples,
            batch_size=batch_size,
            labels=[labels[i] for i in index],
            origins=origins,
            source=f"image folder: {root}",
            sampling_info=info,
            preprocessing={"kind": "image", "mode": mode, "transform": describe_transform(transform)},
            copy=False,
        )

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> ModelInput:
        """A copy of sample `i` (no batch dimension)."""
        return _clone(self._samples[i])

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
            self._fingerprint = hash_samples(self._samples, self._description["preprocessing"])
        return self._fingerprint

    @property
    def description(self) -> dict[str, Any]:
        """JSON-able provenance: source, count, limit, seed, sampling, preprocessing (a copy)."""
        import copy

        return copy.deepcopy(self._description)


def _clone(sample: ModelInput) -> ModelInput:
    if isinstance(sample, torch.Tensor):
        return sample.clone()
    if isinstance(sample, dict):
        return {k: v.clone() for k, v in sample.items()}
    return tuple(v.clone() for v in sample)


def call_model(model: nn.Module, batch: ModelInput) -> Any:
    """Run `model` on a batch: `model(**batch)` for a dict, `model(*batch)` for a tuple/list,
    `model(batch)` for a Tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise CalibrationDataError(f"call_model: batch is a {type(batch).__name__}; expected a Tensor, tuple or dict of Tensors")

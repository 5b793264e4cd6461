"""Reading calibration text (strings, .txt, .jsonl) and tokenizing it into model inputs.

The tokenizer is any Hugging Face-style callable: `tokenizer(texts, truncation=True,
max_length=n)` returning a mapping with `input_ids` (and usually `attention_mask`) as lists of
token-id lists. transformers itself is never imported here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ptqkit.core.errors import CalibrationDataError, ConfigError

__all__ = ["read_texts", "tokenize", "JSONL_SUFFIXES", "SPLITS", "prepare_text"]

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SPLITS = ("paragraph", "line")
# Text is cut before it is tokenized: a sample never needs more than max_length tokens, and a
# tokenizer given one 50 MB line builds gigabytes of offsets before it truncates. The first cut
# keeps CHARS_PER_TOKEN characters per token (natural text has 3-6) and at least MIN_CHARS; a
# cut text that gives fewer than max_length tokens is cut again 8x longer, up to
# MAX_CHARS_PER_TOKEN per token, so the tokens kept are the ones the whole text would give.
MIN_CHARS = 4096
CHARS_PER_TOKEN = 64
MAX_CHARS_PER_TOKEN = 4096


def _split_plain(content: str, split: str, name: str) -> list[tuple[str, str]]:
    """(text, where) per paragraph (blank-line separated) or per non-empty line."""
    out: list[tuple[str, str]] = []
    block: list[str] = []
    start = 0
    for number, line in enumerate(content.splitlines(), start=1):
        if split == "line":
            if line.strip():
                out.append((line.strip(), f"line {number} of {name}"))
            continue
        if line.strip():
            if not block:
                start = number
            block.append(line.rstrip())
        elif block:
            out.append(("\n".join(block).strip(), f"paragraph at line {start} of {name}"))
            block = []
    if block:
        out.append(("\n".join(block).strip(), f"paragraph at line {start} of {name}"))
    return out


def _read_jsonl(content: str, text_key: str, name: str) -> tuple[list[tuple[str, str]], int]:
    out: list[tuple[str, str]] = []
    blank = 0
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationDataError(
                f"line {number} of {name} is not valid JSON ({err.msg}); a .jsonl file needs one JSON object per line"
            ) from None
        except (ValueError, RecursionError) as err:  # a number of more than 4300 digits, nesting too deep
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            raise CalibrationDataError(
                f"line {number} of {name} cannot be read as JSON ({reason}); a .jsonl file needs one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise CalibrationDataError(
                f"line {number} of {name} is a JSON {type(record).__name__}; expected an object with a {text_key!r} field"
            )
        if text_key not in record:
            raise CalibrationDataError(
                f"line {number} of {name} has no {text_key!r} field (fields: {sorted(record)}); pass text_key= to choose one"
            )
        text = record[text_key]
        if not isinstance(text, str):
            raise CalibrationDataError(
                f"line {number} of {name}: field {text_key!r} is a {type(text).__name__}; expected a string"
            )
        if text.strip():
            out.append((text, f"line {number} of {name}"))
        else:
            blank += 1
    return out, blank


def read_texts(
    source: Any, *, text_key: str = "text", split: str = "paragraph"
) -> tuple[list[tuple[str, str]], str, dict[str, Any]]:
    """Non-blank texts with where each came from, a name for the source, and how it was read.

    `source`: a list/tuple of strings, or a path (str or PathLike) to a `.jsonl`/`.ndjson` file
    or a UTF-8 plain-text file (split per `split`). A str is always a path; literal texts go in
    a list.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not valid: use one of {list(SPLITS)}")
    if not isinstance(text_key, str) or not text_key:
        raise ConfigError(
            f"text_key={text_key!r} is not valid: use the name of the JSON field holding the text"
        )
    if isinstance(source, (list, tuple)):
        out = []
        for i, text in enumerate(source):
            if not isinstance(text, str):
                raise CalibrationDataError(
                    f"text {i} of the list is a {type(text).__name__}; from_text needs strings"
                )
            if text.strip():
                out.append((text, f"text {i}"))
        if len(out) < len(source):
            logger.warning(
                "from_text: skipped %d blank text(s) of %d", len(source) - len(out), len(source)
            )
        return out, f"list of {len(source)} texts", {"reader": "list"}
    if not isinstance(source, (str, os.PathLike)):
        raise CalibrationDataError(
            f"from_text: source is a {type(source).__name__}; pass a list of strings or a path to a .txt/.jsonl file"
        )
    path = Path(source)
    if not path.is_file():
        raise CalibrationDataError(
            f"text source {os.fspath(source)!r} is not a file; pass a path to a .txt or .jsonl file, "
            "or a list of strings for literal texts"
        )
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationDataError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None
    if path.suffix.lower() in JSONL_SUFFIXES:
        texts, blank = _read_jsonl(content, text_key, path.name)
        if blank:
            logger.warning(
                "from_text: skipped %d record(s) with blank %r in %s", blank, text_key, path
            )
        return texts, os.fspath(path), {"reader": "jsonl", "text_key": text_key}
    return (
        _split_plain(content, split, path.name),
        os.fspath(path),
        {"reader": "plain", "split": split},
    )


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            if attr != "pad_token_id":
                logger.info("tokenizer has no pad token; padding input_ids with %s=%d", attr, value)
            return value
    logger.info(
        "tokenizer has neither a pad nor an eos token; padding input_ids with 0 (masked out)"
    )
    return 0


def _cut(text: str, chars: int, from_left: bool) -> str:
    """At most `chars` characters of `text` from its start (its end with `from_left`), cut at a
    whitespace so no word is split (unless the kept part holds no whitespace in its second half)."""
    if len(text) <= chars:
        return text
    if from_left:
        kept = text[-chars:]
        space = min((i for i in (kept.find(" "), kept.find("\n"), kept.find("\t")) if i >= 0), default=-1)
        return kept[space + 1 :] if 0 <= space < chars // 2 else kept
    kept = text[:chars]
    space = max(kept.rfind(" "), kept.rfind("\n"), kept.rfind("\t"))
    return kept[:space] if space > chars // 2 else kept


def _encode(texts: list[str], tokenizer: Any, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    if not hasattr(encoded, "keys") or "input_ids" not in encoded:
        raise CalibrationDataError(
            f"tokenizer {type(tokenizer).__name__} returned {type(encoded).__name__} without 'input_ids'"
        )
    ids = list(encoded["input_ids"])
    masks = list(encoded["attention_mask"]) if "attention_mask" in encoded else [[1] * len(row) for row in ids]
    return ids, masks


def _encode_bounded(texts: list[str], tokenizer: Any, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """`tokenizer(texts, truncation=True, max_length=max_length)`'s input_ids and attention_mask,
    with each text cut (see MIN_CHARS) before it is tokenized: the same tokens, bounded memory."""
    from_left = getattr(tokenizer, "truncation_side", "right") == "left"
    chars = max(MIN_CHARS, CHARS_PER_TOKEN * max_length)
    ceiling = max(MIN_CHARS, MAX_CHARS_PER_TOKEN * max_length)
    ids, masks = _encode([_cut(t, chars, from_left) for t in texts], tokenizer, max_length)
    short = [i for i, t in enumerate(texts) if len(t) > chars and len(ids[i]) < max_length]
    while short and chars < ceiling:  # a cut text that gave fewer tokens than asked: cut longer
        chars = min(chars * 8, ceiling)
        again_ids, again_masks = _encode([_cut(texts[i], chars, from_left) for i in short], tokenizer, max_length)
        for i, row, mask in zip(short, again_ids, again_masks):
            ids[i], masks[i] = row, mask
        short = [i for i in short if len(texts[i]) > chars and len(ids[i]) < max_length]
    if short:
        logger.warning(
            "%d text(s) hold more than %d characters per token; each was cut to its first %d characters before tokenizing",
            len(short), MAX_CHARS_PER_TOKEN, chars,
        )
    return ids, masks


def tokenize(
    texts: Sequence[str], tokenizer: Any, *, max_length: int
) -> tuple[list[dict[str, torch.Tensor]], int, dict[str, Any]]:
    """Tokenize `texts` (truncated to `max_length`) into {input_ids, attention_mask} int64 samples.

    Returns the samples, the pad id for input_ids, and a JSON-able description of the tokenizer.
    """
    if not callable(tokenizer):
        raise ConfigError(
            f"tokenizer={tokenizer!r} is not callable; pass a Hugging Face tokenizer (AutoTokenizer.from_pretrained(local_dir))"
        )
    ids, masks = _encode_bounded(list(texts), tokenizer, max_length)
    samples = []
    for i, (row, mask) in enumerate(zip(ids, masks)):
        if len(row) == 0:
            raise CalibrationDataError(
                f"tokenizer produced no tokens for text {i} ({texts[i][:40]!r})"
            )
        if len(row) > max_length:  # HF tokenizers skip truncation when max_length leaves no room beside the special tokens
            raise ConfigError(
                f"max_length={max_length} is too short for tokenizer {type(tokenizer).__name__}: it returned {len(row)} "
                f"tokens for text {i} (it adds special tokens and truncates only the text beside them); use a larger max_length"
            )
        samples.append(
            {
                "input_ids": torch.tensor(row, dtype=torch.long),  # [L]
                "attention_mask": torch.tensor(mask, dtype=torch.long),  # [L]
            }
        )
    pad_id = _pad_id(tokenizer)
    name = getattr(tokenizer, "name_or_path", "") or ""
    description = {
        "tokenizer": type(tokenizer).__name__,
        "tokenizer_name": os.path.basename(str(name).rstrip("/\\")),
        "vocab_size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "max_length": max_length,
        "truncation": True,
    }
    return samples, pad_id, description


def prepare_text(
    source: Any,
    tokenizer: Any,
    *,
    max_length: int,
    limit: int | None,
    seed: int,
    text_key: str,
    split: str,
) -> dict[str, Any]:
    """Read, sample (before tokenizing) and tokenize texts; the CalibrationData arguments.

    Returns samples, pad_id, pad_values, origins, source, sampling_info and preprocessing.
    """
    from ptqkit.calibration.sampling import choose

    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ConfigError(
            f"max_length={max_length!r} is not valid: use a positive number of tokens"
        )
    texts, source_name, reading = read_texts(source, text_key=text_key, split=split)
    if not texts:
        raise CalibrationDataError(
            f"calibration data is empty: {source_name} holds no non-blank text"
        )
    index, info = choose(len(texts), limit, seed, None)
    chosen = [texts[i] for i in index]
    samples, pad_id, tokenizing = tokenize([t for t, _ in chosen], tokenizer, max_length=max_length)
    return {
        "samples": samples,
        "pad_id": pad_id,
        "pad_values": {"attention_mask": 0},
        "origins": [f"sample {i} ({where})" for i, (_, where) in zip(index, chosen)],
        "source": f"text: {source_name}",
        "sampling_info": info,
        "preprocessing": {"kind": "text", **reading, **tokenizing},
    }

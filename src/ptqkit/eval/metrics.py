"""Task metrics for comparing a quantized model with its float reference, computed the same way
for both: perplexity, sentence-embedding cosine, top-1/top-k agreement, softmax KL, output SQNR."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptqkit.core.errors import ConfigError
from ptqkit.core.primitives import sqnr_db

__all__ = [
    "perplexity",
    "token_windows",
    "mean_pooled_embeddings",
    "embedding_cosine",
    "top1_agreement",
    "topk_agreement",
    "mean_softmax_kl",
    "logits_of",
    "output_sqnr_db",
    "finite_rows",
]


def token_windows(tokenizer: Any, texts: Sequence[str], window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Concatenate `texts` (separated by the EOS token when there is one), tokenize, and cut
    into non-overlapping windows of `window` tokens: [n_windows, window]."""
    if window < 2:
        raise ConfigError(f"window={window} must be at least 2 tokens")
    separator = getattr(tokenizer, "eos_token", None) or "\n\n"
    ids = tokenizer(separator.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"{len(ids)} tokens of text make no window of {window} tokens; give more text")
    return ids[: n * window].reshape(n, window)  # [n, window]


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, *, distributed: bool = False) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of every window.

    With `distributed=True` (every rank of a torch.distributed job calls it with the same
    windows) each rank runs a contiguous share of the batches and the per-batch sums are
    gathered and added in batch order: the same number as one process."""
    starts = list(range(0, len(windows), batch_size))
    parallel = None
    if distributed:
        from ptqkit.stats.distributed import DataParallel

        parallel = DataParallel.current()
        starts = [starts[index] for index in parallel.my_batches(len(starts))]
    sums: list[tuple[float, int]] = []  # (summed NLL, predicted tokens) per batch
    for start in starts:
        ids = windows[start : start + batch_size]
        logits = model(input_ids=ids).logits.float()  # [B, T, V]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        sums.append((float(nll), ids[:, 1:].numel()))
    if parallel is not None:
        sums = [item for rank_sums in parallel.gather(sums) for item in rank_sums]
    total_nll, total_tokens = 0.0, 0
    for nll, tokens in sums:
        total_nll += nll
        total_tokens += tokens
    return math.exp(total_nll / total_tokens)


@torch.inference_mode()
def mean_pooled_embeddings(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers' mean pooling defines them, L2-normalized: [N, H]."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.float()  # [B, T, H]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # [B, H]
        out.append(F.normalize(pooled, dim=-1))
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity: [N]."""
    return F.cosine_similarity(reference.float(), candidate.float(), dim=-1)


@torch.inference_mode()
def logits_of(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Model outputs for a stack of inputs, batched: [N, ...]."""
    return torch.cat([model(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)])


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """[...] True where every value along the last axis of every tensor is finite: a row holding
    NaN/Inf on either side counts as a failed comparison, never as agreement."""
    keep = torch.ones(tensors[0].shape[:-1], dtype=torch.bool)
    for tensor in tensors:  # amax/amin propagate NaN: two row reductions, no tensor-sized mask
        keep &= (torch.isfinite(tensor.amax(-1)) & torch.isfinite(tensor.amin(-1))).cpu()
    return keep


def top1_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Share of rows whose arg-max class is the same (a row holding NaN/Inf disagrees)."""
    same = (reference_logits.argmax(-1) == candidate_logits.argmax(-1)).cpu() & finite_rows(reference_logits, candidate_logits)
    return float(same.float().mean())


def output_sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """SQNR of the candidate's outputs against the reference's, in dB (-inf when either holds NaN/Inf)."""
    return sqnr_db(reference, candidate)


def topk_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor, k: int = 5) -> float:
    """Share of rows whose reference arg-max class is among the candidate's k highest."""
    if reference_logits.shape != candidate_logits.shape or reference_logits.ndim != 2:
        raise ConfigError(
            f"topk_agreement: logits must be two equal [N, classes] shapes, got "
            f"{tuple(reference_logits.shape)} and {tuple(candidate_logits.shape)}"
        )
    if not 1 <= k <= reference_logits.shape[1]:
        raise ConfigError(f"topk_agreement: k={k!r} must be in [1, {reference_logits.shape[1]}] (the number of classes)")
    top = candidate_logits.topk(k, dim=-1).indices  # [N, k]
    found = (top == reference_logits.argmax(-1, keepdim=True)).any(-1).cpu() & finite_rows(reference_logits, candidate_logits)
    return float(found.float().mean())  # a row holding NaN/Inf counts as a miss


def mean_softmax_kl(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) ‖ softmax(candidate)), in nats, in float64; +inf
    when a row holds NaN/Inf on either side."""
    if reference_logits.shape != candidate_logits.shape:
        raise ConfigError(
            f"mean_softmax_kl: logits shapes differ: {tuple(reference_logits.shape)} vs {tuple(candidate_logits.shape)}"
        )
    log_p = F.log_softmax(reference_logits.double(), dim=-1)  # [N, classes]
    log_q = F.log_softmax(candidate_logits.double(), dim=-1)  # [N, classes]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [N]
    return float(kl.where(finite_rows(reference_logits, candidate_logits).to(kl.device), math.inf).mean())

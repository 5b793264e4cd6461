"""The KV cache of a Hugging Face causal LM's forward, across transformers versions.

transformers 5.24 renamed the forward's `past_key_values` argument and output field to `cache`
(the old names still work there, with a deprecation warning, until 5.40). ptqkit passes and
reads the cache under whichever name the model's forward declares.
"""
from __future__ import annotations

import inspect
from typing import Any

__all__ = ["CACHE_KEYWORDS", "cache_keyword", "cached_forward", "output_cache"]

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


def cache_keyword(forward: Any) -> str | None:
    """The name under which `forward` takes a KV cache, or None when it takes none."""
    parameters = inspect.signature(forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in parameters), None)


def output_cache(output: Any) -> Any:
    """The cache a forward returned (`output.cache`, or `output.past_key_values` before 5.24)."""
    for name in CACHE_KEYWORDS:
        if name in output:  # ModelOutput: a mapping of the fields that were set
            return output[name]
    raise KeyError(f"{type(output).__name__} holds no KV cache (fields: {list(output.keys())}); pass use_cache=True")


def cached_forward(model: Any, cache: Any = None, **inputs: Any) -> Any:
    """`model(**inputs, <cache keyword>=cache, use_cache=True)`; the cache keyword is the forward's own."""
    keyword = cache_keyword(model.forward)
    if keyword is None:
        raise TypeError(f"{type(model).__name__}.forward takes no KV cache argument ({' / '.join(CACHE_KEYWORDS)})")
    if cache is not None:
        inputs[keyword] = cache
    return model(**inputs, use_cache=True)

"""The KV-cache keyword across transformers versions (`ptqkit.models.hf_cache`).

transformers 5.24 renamed `past_key_values` to `cache` (argument and output field). The helpers
must pick the forward's own name: checked on stand-in forwards for both spellings and on a real
tiny LlamaForCausalLM, where two cached steps must reproduce the uncached logits (tolerance
1e-5 x max |logit|, float32 summation order).
"""
from __future__ import annotations

import pytest
import torch

from ptqkit.models.hf_cache import cache_keyword, cached_forward, output_cache

transformers = pytest.importorskip("transformers")


def _new_style(input_ids=None, cache=None, use_cache=None): ...


def _old_style(input_ids=None, past_key_values=None, use_cache=None): ...


def _no_cache(input_ids=None): ...


def test_cache_keyword_follows_the_forward_signature() -> None:
    assert cache_keyword(_new_style) == "cache"
    assert cache_keyword(_old_style) == "past_key_values"
    assert cache_keyword(_no_cache) is None


def test_output_cache_reads_either_field_and_names_missing_ones() -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    marker = object()
    fields = set(CausalLMOutputWithPast.__dataclass_fields__)
    name = "cache" if "cache" in fields else "past_key_values"
    assert output_cache(CausalLMOutputWithPast(logits=torch.zeros(1), **{name: marker})) is marker
    with pytest.raises(KeyError, match=r"CausalLMOutputWithPast holds no KV cache .*use_cache=True"):
        output_cache(CausalLMOutputWithPast(logits=torch.zeros(1)))


def test_cached_forward_refuses_a_model_without_a_cache() -> None:
    class Plain(torch.nn.Module):
        def forward(self, input_ids=None):
            return input_ids

    with pytest.raises(TypeError, match=r"Plain.forward takes no KV cache argument \(cache / past_key_values\)"):
        cached_forward(Plain(), input_ids=torch.zeros(1, 1))


@torch.inference_mode()
def test_cached_steps_match_the_uncached_forward_of_a_real_llama() -> None:
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor([[5, 17, 3, 60, 11]])
    full = model(input_ids=ids, use_cache=False).logits

    out = cached_forward(model, input_ids=ids[:, :3])
    out = cached_forward(model, output_cache(out), input_ids=ids[:, 3:4])
    out = cached_forward(model, output_cache(out), input_ids=ids[:, 4:5])
    assert output_cache(out).get_seq_length() == 5
    assert (out.logits[0, -1] - full[0, -1]).abs().max() <= 1e-5 * full.abs().max()

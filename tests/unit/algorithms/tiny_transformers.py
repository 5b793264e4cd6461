"""Randomly initialised miniature Hugging Face models of the four families the mapping table
covers (LLaMA with grouped-query attention, GPT-2, OPT, BERT), and token batches for them.
Weights and activations get a few large input channels, as real LLMs have, so that SmoothQuant
and AWQ have something to do."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _outlier_norms_(model: torch.nn.Module) -> torch.nn.Module:
    """Give every LayerNorm/RMSNorm weight a few large channels (activation outliers)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                weight = module.weight
                weight.copy_(1.0 + 0.1 * torch.randn(weight.shape, generator=generator))
                weight[:: max(1, weight.numel() // 3)] *= 8.0
    return model.eval()


def tiny_llama(kv_heads: int = 2) -> torch.nn.Module:
    """4 query heads; 2 key/value heads (grouped-query attention) by default, 4 without."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return _outlier_norms_(transformers.LlamaForCausalLM(config))


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    return _outlier_norms_(transformers.GPT2LMHeadModel(config))


def tiny_opt() -> torch.nn.Module:
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return _outlier_norms_(transformers.OPTForCausalLM(config))


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return _outlier_norms_(transformers.BertModel(config))


FAMILIES = {"llama": tiny_llama, "llama_mha": lambda: tiny_llama(kv_heads=4), "gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert}


def token_batch(samples: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, length), generator=torch.Generator().manual_seed(seed))


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def check_bert_artifact_round_trip(qmodel: torch.nn.Module, ids: torch.Tensor, out_dir: Path, tamper: Callable[[dict], None]) -> Path:
    """Save a quantized `tiny_bert`, load it onto a fresh skeleton and check identical outputs;
    then apply `tamper` to the JSON record of layer 0's query and write it back. Returns the
    artifact directory, for the caller to check that loading it now fails."""
    from ptqkit.export import artifact
    from ptqkit.export.load import load_artifact

    artifact.save_artifact(qmodel, out_dir)
    assert torch.equal(outputs(load_artifact(out_dir, tiny_bert()), ids), outputs(qmodel, ids))
    record = json.loads((out_dir / "quantization.json").read_text())
    tamper(next(l for l in record["layers"] if l["name"] == "encoder.layer.0.attention.self.query"))
    (out_dir / "quantization.json").write_text(json.dumps(record))
    return out_dir

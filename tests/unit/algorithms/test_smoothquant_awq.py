"""SmoothQuant and AWQ: closed-form scales, the search against brute force, and "nothing
changed" (the float model's outputs within 1e-5 relative) on miniature LLaMA, GPT-2, OPT and
BERT models after the function-preserving rescaling."""
from __future__ import annotations

import copy

import pytest
import torch

import ptqkit as pq
from ptqkit.algorithms import AWQConfig, SmoothQuantConfig
from ptqkit.algorithms.awq import _fake_quant, awq_clip_ratios, awq_scales, awq_search_scales
from ptqkit.algorithms.blockwise import transform_blocks_
from ptqkit.algorithms.smoothquant import smoothing_scales
from ptqkit.core.errors import ConfigError, UnsupportedModelError
from ptqkit.core.qtypes import PerChannel, PerGroup, QType
from ptqkit.core.spec import QuantSpec
from ptqkit.models.mappings import find_block_list, resolve_scale_groups

from .tiny_transformers import FAMILIES, outputs, tiny_llama, token_batch

INT4_G16 = QuantSpec(qtype=QType.int(4), granularity=PerGroup(16), symmetric=True)
INT4_PC = QuantSpec(qtype=QType.int(4), granularity=PerChannel(0), symmetric=True)


def _linear_targets(model: torch.nn.Module, spec: QuantSpec) -> dict[str, tuple[str, QuantSpec]]:
    return {
        name: (type(m).__name__, spec)
        for name, m in model.named_modules()
        if type(m).__name__ in ("Linear", "Conv1D") and "head" not in name
    }


def _relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((candidate - reference).norm() / reference.norm())


# ---- SmoothQuant -------------------------------------------------------------------------------
def test_smoothing_scales_closed_form() -> None:
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0])
    # s = sqrt(act) / sqrt(weight) at alpha 0.5; zero ranges give s = 1
    assert torch.allclose(smoothing_scales(act, weight, 0.5), torch.tensor([2.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(smoothing_scales(act, weight, 1.0)[:2], torch.tensor([4.0, 1.0]))
    assert torch.allclose(smoothing_scales(act, weight, 0.0)[:2], torch.tensor([1.0, 0.25]))


def test_smoothquant_config_validation_and_overrides() -> None:
    config = SmoothQuantConfig(alpha=0.5, alpha_overrides=[["*.post_attention_layernorm", 0.8]])
    assert config.alpha_for("model.layers.3.post_attention_layernorm") == 0.8
    assert config.alpha_for("model.layers.3.input_layernorm") == 0.5
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ConfigError, match=r"alpha_overrides\[0\]: expected \[glob, alpha\]"):
        SmoothQuantConfig(alpha_overrides=[0.3])
    recipe = pq.Recipe.from_preset("w8a8", algorithms=(config,))
    assert pq.Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smoothquant_and_awq_leave_the_float_model_unchanged(family: str) -> None:
    model = FAMILIES[family]()
    ids = token_batch()
    reference = outputs(model, ids)
    transformed = copy.deepcopy(model)
    targets = _linear_targets(transformed, INT4_G16)
    details = transform_blocks_(
        transformed, targets, (SmoothQuantConfig(alpha=0.6), AWQConfig(clip=False, grid=8)),
        [{"input_ids": ids}], max_samples=8, progress=False,
    )
    changed = [n for n, p in transformed.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert changed, f"{family}: no parameter was rescaled"
    assert all(d.get("smoothquant") for d in details.values())
    # measured: 2e-8 (BERT) .. 5e-7 (OPT) relative on these models
    assert _relative_error(reference, outputs(transformed, ids)) < 1e-5


def test_scale_groups_follow_the_table_and_skip_grouped_query_attention(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()  # 4 query heads, 2 key/value heads: v_proj is 32 wide, o_proj reads 64
    name, blocks = find_block_list(model)
    assert name == "model.layers" and len(blocks) == 2
    with caplog.at_level("INFO", logger="ptqkit.models.mappings"):
        groups = resolve_scale_groups(blocks[0], "model.layers.0")
    assert [g.source for g in groups] == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.0.mlp.up_proj"
    ]
    assert "self_attn.v_proj -> ['self_attn.o_proj'] skipped: source width 32 != projection input width(s) [64]" in caplog.text
    mha = FAMILIES["llama_mha"]()
    assert len(resolve_scale_groups(mha.model.layers[0], "model.layers.0")) == 4


def test_block_without_a_mapping_row_names_what_to_add() -> None:
    class MyBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.proj = torch.nn.Linear(8, 8)

    with pytest.raises(UnsupportedModelError, match=r"no scale-group mapping for block class 'MyBlock'.*add a BlockMapping"):
        resolve_scale_groups(MyBlock(), "blocks.0")


# ---- AWQ ---------------------------------------------------------------------------------------
def test_awq_scales_are_normalised() -> None:
    mean_abs = torch.tensor([0.1, 1.0, 10.0, 3.0])
    s = awq_scales(mean_abs, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(awq_scales(mean_abs, 0.0), torch.ones(4))
    assert torch.argmax(s) == 2  # the most active channel is scaled up most


def test_awq_search_matches_brute_force_and_never_loses_to_rtn() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=generator) * torch.linspace(0.1, 6.0, 32)  # [n, C], salient channels
    weights = [torch.randn(24, 32, generator=generator), torch.randn(16, 32, generator=generator)]
    specs = [INT4_G16, INT4_PC]
    scales, alpha, losses = awq_search_scales(x, x.abs().mean(0), weights, specs, grid=10)
    brute = []
    for k in range(10):  # float64 recomputation of the objective, straight from the definition
        s = awq_scales(x.abs().mean(0), k / 10).double()
        brute.append(sum(
            float(((x.double() @ (_fake_quant((w * s.float()[None]), spec).double() / s[None]).T) - x.double() @ w.double().T).pow(2).sum())
            for w, spec in zip(weights, specs)
        ))
    assert torch.allclose(torch.tensor(losses, dtype=torch.float64), torch.tensor(brute, dtype=torch.float64), rtol=1e-4)
    assert alpha == min(range(10), key=lambda k: brute[k]) / 10
    assert min(losses) <= losses[0]  # alpha = 0 is round-to-nearest
    assert alpha > 0  # measured: 0.5 on this data; RTN (alpha 0) loses
    assert torch.equal(scales, awq_scales(x.abs().mean(0), alpha))


def test_awq_clip_ratio_is_the_per_group_brute_force_minimum() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(128, 40, generator=generator)  # 40 = 2 x 16 + 8: a ragged last group
    w = torch.randn(6, 40, generator=generator)
    w[0, 3] = 9.0  # an outlier weight on a nearly silent input: clipping its group pays off
    x[:, 3] *= 0.01
    ratios = awq_clip_ratios(x, w, INT4_G16, clip_grid=10, max_shrink=0.5)
    assert ratios.shape == (6, 3)
    for row in range(6):
        for group, (lo, hi) in enumerate(((0, 16), (16, 32), (32, 40))):
            errors = []
            for k in range(11):
                r = 1.0 - 0.5 * k / 10
                clipped = w.clone()
                part = clipped[row : row + 1, lo:hi]
                clipped[row : row + 1, lo:hi] = part.clamp(part.min() * r, part.max() * r)
                deq = _fake_quant(clipped, INT4_G16)
                errors.append(float((x[:, lo:hi].double() @ (w[row, lo:hi] - deq[row, lo:hi]).double()).pow(2).sum()))
            best = 1.0 - 0.5 * min(range(11), key=lambda k: (errors[k], k)) / 10
            assert ratios[row, group] == pytest.approx(best), (row, group)
    assert ratios[0, 0] < 1.0


def test_awq_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"awq.grid: 0 must be an integer in \[1, 1000\]"):
        AWQConfig(grid=0)
    with pytest.raises(ConfigError, match=r"awq.max_shrink: 1.0 must be a number in \[0, 1\)"):
        AWQConfig(max_shrink=1.0)
    recipe = pq.Recipe.from_preset("w4a16", algorithms=(AWQConfig(grid=10), pq.algorithms.GPTQConfig()))
    assert pq.Recipe.from_dict(recipe.to_dict()) == recipe

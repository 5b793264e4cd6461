"""ptqkit artifact: round trip (bit-identical codes/QParams, same outputs), file layout, determinism,
HF config with quantization_config, and typed errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ArtifactError
from ptqkit.core.primitives import unpack_lowbit
from ptqkit.core.qtypes import PerChannel, PerGroup
from ptqkit.core.spec import QuantSpec
from ptqkit.engine.recipe import Override, Recipe, Scheme
from ptqkit.export.artifact import MODEL_FILE, QUANT_FILE, save_artifact
from ptqkit.export.load import load_artifact
from ptqkit.nn.modules import QuantConv, QuantEmbedding, QuantizedModule, QuantLinear


class Toy(nn.Module):
    """Embedding + Linear + Conv2d + an lm_head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.proj = nn.Linear(64, 48)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.out = nn.Linear(48, 64, bias=False)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.norm = nn.LayerNorm(64)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.emb(ids))
        return self.head(self.out(torch.relu(self.proj(h)))), self.conv(image)


def _toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (2, 7), generator=gen), torch.randn(2, 3, 9, 9, generator=gen)


RECIPES = {
    "w8a16": Recipe.from_preset("w8a16", targets=("Linear", "Conv2d")),
    "w4a16_g32": Recipe.from_preset("w4a16", group_size=32, targets=("Linear",)),
    "w8a8_dynamic": Recipe.from_preset("w8a8_dynamic", targets=("Linear", "Conv2d")),
    "mixed": Recipe(
        scheme=Scheme(weights=QuantSpec(qtype="int8", granularity=PerChannel(0))),
        targets=("Linear", "Conv2d", "Embedding"),
        ignore=("head",),
        overrides=(
            Override(match=("proj",), scheme=Scheme(weights=QuantSpec(qtype="uint4", granularity=PerGroup(16), symmetric=False))),
            Override(match=("out",), scheme=Scheme(weights=QuantSpec(qtype="int2", granularity=PerGroup(8)))),
            Override(match=("conv",), scheme=Scheme(weights=QuantSpec(qtype="fp8_e4m3", granularity=PerChannel(0)))),
            Override(match=("emb",), scheme=Scheme(weights=QuantSpec(qtype="int3", granularity=PerChannel(0)))),
        ),
    ),
}


def _assert_same_quantization(a: nn.Module, b: nn.Module) -> None:
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QuantizedModule)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QuantizedModule)}
    assert qa.keys() == qb.keys() and qa
    for name, ma in qa.items():
        mb = qb[name]
        assert type(ma) is type(mb) and ma.weight_spec == mb.weight_spec
        assert ma.weight_codes.dtype == mb.weight_codes.dtype
        assert torch.equal(ma.weight_codes.view(torch.uint8) if ma.weight_codes.dtype.is_floating_point else ma.weight_codes,
                           mb.weight_codes.view(torch.uint8) if mb.weight_codes.dtype.is_floating_point else mb.weight_codes)
        assert torch.equal(ma.weight_scale, mb.weight_scale) and torch.equal(ma.weight_zero_point, mb.weight_zero_point)
        assert ma.weight_qparams.granularity == mb.weight_qparams.granularity
        assert torch.equal(ma.weight, mb.weight)
        ia, ib = ma.input_quantizer, mb.input_quantizer
        assert (ia is None) == (ib is None)
        if ia is not None:
            assert ia.spec == ib.spec


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_round_trip_is_bit_identical(tmp_path: Path, name: str) -> None:
    qmodel = pq.quantize(_toy(), RECIPES[name], progress=False)
    save_artifact(qmodel, tmp_path / "a", metrics={"sqnr_db": 31.5})
    loaded = load_artifact(tmp_path / "a", _toy(seed=7))  # a skeleton with different float weights
    _assert_same_quantization(qmodel, loaded)
    for (ka, va), (kb, vb) in zip(qmodel.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and va.dtype == vb.dtype
        assert torch.equal(va.view(torch.uint8) if va.dtype.is_floating_point and va.element_size() == 1 else va,
                           vb.view(torch.uint8) if vb.dtype.is_floating_point and vb.element_size() == 1 else vb), ka
    ids, image = _inputs()
    for ya, yb in zip(qmodel(ids, image), loaded(ids, image)):
        assert torch.equal(ya, yb)
    assert loaded.ptqkit_info.recipe == qmodel.ptqkit_info.recipe
    assert loaded.ptqkit_info.plan.render() == qmodel.ptqkit_info.plan.render()
    manifest = json.loads((tmp_path / "a" / QUANT_FILE).read_text())
    assert manifest["metrics"] == {"sqnr_db": 31.5}
    assert manifest["versions"]["torch"] == torch.__version__


def test_storage_layout(tmp_path: Path) -> None:
    qmodel = pq.quantize(_toy(), RECIPES["mixed"], progress=False)
    save_artifact(qmodel, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / MODEL_FILE), framework="pt") as f:
        keys = set(f.keys())
        proj = f.get_tensor("proj.weight_packed")
        assert proj.dtype == torch.uint8 and proj.shape == (48, 32)  # uint4: two codes per byte
        assert torch.equal(unpack_lowbit(proj, 4, 64, signed=False), qmodel.proj.weight_codes)
        out = f.get_tensor("out.weight_packed")
        assert out.dtype == torch.uint8 and out.shape == (64, 12)  # int2: four codes per byte
        assert f.get_tensor("emb.weight_codes").dtype == torch.int8  # int3 stays one code per byte
        assert f.get_tensor("conv.weight_codes").dtype == torch.float8_e4m3fn
        assert f.get_tensor("proj.weight_scale").shape == (48, 4)
    assert "proj.weight_codes" not in keys
    # the tied head (float, ignored) and the now-quantized embedding no longer share storage
    assert "head.weight" in keys
    qmodel = pq.quantize(_toy(), RECIPES["w8a16"], progress=False)  # embedding float, head quantized
    save_artifact(qmodel, tmp_path / "b")
    with safe_open(str(tmp_path / "b" / MODEL_FILE), framework="pt") as f:
        assert f.get_tensor("proj.weight_codes").dtype == torch.int8
        assert "emb.weight" in set(f.keys())


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    qmodel = pq.quantize(_toy(), Recipe.from_preset("w8a16", ignore=("head",)), progress=False)
    save_artifact(qmodel, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / QUANT_FILE).read_text())
    assert manifest["aliases"] == {"head.weight": "emb.weight"}
    loaded = load_artifact(tmp_path / "a", _toy(seed=3))
    assert loaded.head.weight is loaded.emb.weight
    assert torch.equal(loaded.emb.weight, qmodel.emb.weight)


def test_same_recipe_twice_gives_identical_bytes(tmp_path: Path) -> None:
    for run in ("one", "two"):
        qmodel = pq.quantize(_toy(), RECIPES["mixed"], progress=False)
        save_artifact(qmodel, tmp_path / run)
    for name in (MODEL_FILE, QUANT_FILE):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_overwrite_keeps_foreign_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    out = tmp_path / "a"
    save_artifact(pq.quantize(_toy(), RECIPES["w8a16"], progress=False), out)
    (out / "model.onnx").write_bytes(b"onnx bytes")
    save_artifact(pq.quantize(_toy(), RECIPES["w4a16_g32"], progress=False), out)
    assert (out / "model.onnx").read_bytes() == b"onnx bytes"
    assert json.loads((out / QUANT_FILE).read_text())["recipe"]["name"] == "w4a16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"Toy has no ptqkit_info; pass the model returned by ptqkit.engine.quantize"):
        save_artifact(_toy(), tmp_path / "a")
    from ptqkit.export.pack import pack

    packed = pack(pq.quantize(_toy(), RECIPES["w8a16"], progress=False))
    with pytest.raises(ArtifactError, match=r"layer 'proj' is a Int8WeightOnlyLinear.*save before packing"):
        save_artifact(packed, tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"file exists and is not a directory"):
        save_artifact(pq.quantize(_toy(), RECIPES["w8a16"], progress=False), tmp_path / "file")


def test_hf_model_config_and_load_from_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    qmodel = pq.quantize(model, Recipe.from_preset("w4a16", group_size=32), progress=False)
    save_artifact(qmodel, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    qc = saved["quantization_config"]
    assert qc["quant_method"] == "ptqkit" and qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["weights"] == {
        "num_bits": 4, "type": "int", "ptqkit_qtype": "int4", "symmetric": True, "strategy": "group",
        "group_size": 32, "dynamic": False, "observer": "minmax", "actorder": None,
    }
    assert group["input_activations"] is None and len(group["targets"]) == 14  # 7 projections x 2 layers
    assert qc["ignore"] == ["lm_head"]
    loaded = load_artifact(tmp_path / "a")  # skeleton built from the artifact's own config.json
    assert type(loaded).__name__ == "LlamaForCausalLM"
    _assert_same_quantization(qmodel, loaded)
    ids = torch.randint(0, 96, (1, 9))
    with torch.inference_mode():
        assert torch.equal(qmodel(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

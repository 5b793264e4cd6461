"""ONNX QDQ export on small Linear/Conv models: placement, stored integers, ORT kernels, agreement, errors."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ptqkit as pq
from ptqkit.core.errors import ExportError, OutputPathError
from ptqkit.export import export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from ptqkit.export.ort_check import make_session, run_session  # noqa: E402


class TwoBranch(nn.Module):
    """MLP on [B, T, 16] (MatMul path) and a Conv2d on [B, 3, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(self.act(self.fc1(x))), self.conv(img)


def _inputs(seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 3, 8, 8, generator=g)


def _per_tensor_dynamic() -> pq.Recipe:
    base = pq.Recipe.from_preset("w8a8_dynamic")
    return replace(base, name="w8a8_dynamic_tensor", scheme=replace(base.scheme, inputs=replace(base.scheme.inputs, granularity=pq.PerTensor())))


def _symmetric_per_token(ignore: tuple[str, ...] = ("conv",)) -> pq.Recipe:
    base = pq.Recipe.from_preset("w8a8_dynamic", ignore=ignore)
    inputs = replace(base.scheme.inputs, qtype="int8", symmetric=True)
    return replace(base, name="w8a8_dynamic_sym", scheme=replace(base.scheme, inputs=inputs))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return TwoBranch().eval()


@pytest.fixture(scope="module")
def static_export(model: nn.Module, tmp_path_factory: pytest.TempPathFactory):
    g = torch.Generator().manual_seed(1)
    calib = pq.CalibrationData.from_tensors([(torch.randn(5, 16, generator=g), torch.randn(3, 8, 8, generator=g)) for _ in range(16)])
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a8"), calib, progress=False)
    out = tmp_path_factory.mktemp("static") / "w8a8"
    return qmodel, export(qmodel, out, example_inputs=_inputs(2), onnx_weight_dtype="uint8"), out


@pytest.fixture(scope="module")
def dynamic_exports(model: nn.Module, tmp_path_factory: pytest.TempPathFactory):
    out = {}
    for name, recipe in (("tensor", _per_tensor_dynamic()), ("token", pq.Recipe.from_preset("w8a8_dynamic", ignore=["conv"])), ("token_sym", _symmetric_per_token())):
        qmodel = pq.quantize(model, recipe, progress=False)
        path = tmp_path_factory.mktemp(name) / "out"
        out[name] = (qmodel, export(qmodel, path, example_inputs=_inputs(3)), path)
    return out


def _graph(path: Path):
    return onnx.load(str(path / "model.onnx")).graph


def _agreement(qmodel: nn.Module, path: Path, inputs) -> float:
    """Max |ORT int8 - ptqkit simulated| on fresh inputs (not the export's example inputs)."""
    with torch.inference_mode():
        ref = qmodel(*inputs)
    got = run_session(make_session(path / "model.onnx"), inputs)
    return max(float(np.abs(r.numpy() - o).max()) for r, o in zip(ref, got))


def test_static_qdq_carries_ptqkit_scales_and_integer_weights(static_export) -> None:
    qmodel, result, path = static_export
    graph = _graph(path)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantize_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) == 3  # fc1, fc2, conv inputs
    for name in ("fc1", "fc2"):
        qp = getattr(qmodel, name).input_quantizer.qparams
        assert float(inits[f"{name}.input_scale"].reshape(-1)[0]) == qp.scale.reshape(-1)[0].item()
        assert int(inits[f"{name}.input_zero_point"].reshape(-1)[0]) == qp.zero_point.reshape(-1)[0].item()
        assert inits[f"{name}.input_zero_point"].dtype == np.uint8
        codes = getattr(qmodel, name).weight_codes.numpy().astype(np.int16)  # [out, in]
        stored = inits[f"{name}.weight_quantized"]  # [in, out], uint8 = code + 128
        assert stored.dtype == np.uint8
        np.testing.assert_array_equal(stored.astype(np.int16) - 128, codes.T)
        np.testing.assert_array_equal(inits[f"{name}.weight_scale"], getattr(qmodel, name).weight_scale.numpy())
        reader = next(n for n in graph.node if f"{name}.weight_quantized" in n.input)
        if reader.op_type == "DequantizeLinear":
            assert onnx.helper.get_attribute_value(reader.attribute[0]) == 1  # out axis of [in, out]
        else:  # the bias went into the kernel (lone_bias_add): scales per output column
            assert reader.op_type == "MatMulIntegerToFloat" and reader.input[1:4:2] == [f"{name}.weight_quantized", f"{name}.weight_scale"]
    # no float copy of a quantized weight is left in the file
    assert not any(i.name.startswith("val_") or i.name == "conv.weight" for i in graph.initializer)


def test_static_layers_run_on_integer_kernels_and_match_simulation(static_export) -> None:
    qmodel, result, path = static_export
    kernels = {l.module: l.kernel for l in result.layers}
    assert kernels == {"fc1": "MatMulIntegerToFloat", "fc2": "MatMulIntegerToFloat", "conv": "ConvInteger"}
    assert result.float_layers == ()
    assert result.checks["fp32_ort_vs_torch"]["max_abs"] < 1e-5
    # same integers, same scales: only float summation order differs (outputs are O(1))
    assert _agreement(qmodel, path, _inputs(7, batch=3)) < 1e-4
    assert (path / "export_report.json").exists() and not (path / "model.fp32.onnx").exists()


@pytest.mark.parametrize(
    "kind, kernel", [("tensor", "DynamicQuantizeMatMul"), ("token", "MatMulIntegerToFloat"), ("token_sym", "MatMulIntegerToFloat")]
)
def test_dynamic_layers_run_on_integer_kernels_and_match_simulation(dynamic_exports, kind: str, kernel: str) -> None:
    qmodel, result, path = dynamic_exports[kind]
    assert result.layers[0].kernel == kernel and result.layers[1].kernel == kernel
    assert all(l.integer for l in result.layers)
    assert _agreement(qmodel, path, _inputs(8, batch=5)) < 1e-4


def test_per_token_differs_from_per_tensor_so_the_agreement_test_can_fail(dynamic_exports) -> None:
    """Guard: the per-token and per-tensor graphs give different numbers on the same inputs."""
    q_tok, _, p_tok = dynamic_exports["token"]
    inputs = _inputs(9)
    a = run_session(make_session(p_tok / "model.onnx"), inputs)[0]
    b = run_session(make_session(dynamic_exports["tensor"][2] / "model.onnx"), inputs)[0]
    c = run_session(make_session(dynamic_exports["token_sym"][2] / "model.onnx"), inputs)[0]
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - c).max() > 1e-3


def test_per_token_codes_come_from_one_per_row_quantize(dynamic_exports) -> None:
    """Per-token graphs quantize each row with one QuantizeLinear (axis 0) and no elementwise rounding."""
    for kind in ("token", "token_sym"):
        ops = [n.op_type for n in _graph(dynamic_exports[kind][2]).node]
        assert ops.count("QuantizeLinear") == 2 and ops.count("MatMulIntegerToFloat") == 2, ops  # fc1, fc2
        assert "Round" not in ops or kind == "token"  # the asymmetric zero point is rounded on [..., 1] only


class SharedInput(nn.Module):
    """Two Linears reading one tensor (an attention block's query/key/value)."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x) * self.key(x)


@pytest.mark.parametrize("symmetric", [False, True])
def test_layers_reading_one_tensor_share_its_per_token_codes(symmetric: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    recipe = _symmetric_per_token(ignore=()) if symmetric else pq.Recipe.from_preset("w8a8_dynamic")
    qmodel = pq.quantize(SharedInput().eval(), recipe, progress=False)
    x = torch.randn(3, 7, 16)
    export(qmodel, tmp_path, example_inputs=x)
    ops = [n.op_type for n in _graph(tmp_path).node]
    assert ops.count("QuantizeLinear") == ops.count("ReduceMax") == 1 and ops.count("MatMulIntegerToFloat") == 2, ops
    with torch.inference_mode():
        ref = qmodel(torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(1)) * 4)
    got = run_session(make_session(tmp_path / "model.onnx"), torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(1)) * 4)[0]
    assert np.abs(ref.numpy() - got).max() < 1e-4 * max(1.0, float(np.abs(got).max()))


def test_int8_storage_keeps_int8_initializers(model: nn.Module, tmp_path: Path) -> None:
    qmodel = pq.quantize(model, _per_tensor_dynamic(), progress=False)
    export(qmodel, tmp_path / "o", example_inputs=_inputs(3), onnx_weight_dtype="int8")
    inits = {i.name: numpy_helper.to_array(i) for i in _graph(tmp_path / "o").initializer}
    assert inits["fc1.weight_quantized"].dtype == np.int8
    np.testing.assert_array_equal(inits["fc1.weight_quantized"], qmodel.fc1.weight_codes.numpy().T)


def test_strict_fails_on_layers_that_stay_float_and_keeps_previous_output(model: nn.Module, tmp_path: Path) -> None:
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a16"), progress=False)  # weight-only conv -> float Conv
    out = tmp_path / "o"
    first = export(qmodel, out, example_inputs=_inputs(3))  # non-strict: reported
    assert first.float_layers == ("conv",)
    (out / "keep.txt").write_text("previous export")
    previous = (out / "model.onnx").read_bytes()
    with pytest.raises(ExportError, match=r"strict.*did not run on an integer kernel: \['conv \(DequantizeLinear"):
        export(qmodel, out, example_inputs=_inputs(3), strict=True)
    assert (out / "keep.txt").read_text() == "previous export" and (out / "model.onnx").read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp directory or lock file left behind
    result = export(qmodel, out, example_inputs=_inputs(3))  # replaces the export; the user's file is kept (issue 28)
    assert result.float_layers == ("conv",) and (out / "keep.txt").read_text() == "previous export"
    mine = tmp_path / "mine"  # a directory holding only the user's own files is never rebuilt
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"'.*mine' is not empty \(notes.txt\) and was not written by ptqkit"):
        export(qmodel, mine, example_inputs=_inputs(3))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_bad_arguments_raise_typed_errors(model: nn.Module, static_export, tmp_path: Path) -> None:
    qmodel = static_export[0]
    with pytest.raises(ExportError, match="has no ptqkit_info"):
        export(model, tmp_path / "a", example_inputs=_inputs(0))
    with pytest.raises(ExportError, match=r"unknown format\(s\) \['tflite'\]; valid: onnx, safetensors"):
        export(qmodel, tmp_path / "a", formats=("tflite",), example_inputs=_inputs(0))
    with pytest.raises(ExportError, match="example_inputs is None"):
        export(qmodel, tmp_path / "a")
    with pytest.raises(ExportError, match="example_inputs must be a tensor.*got int"):
        export(qmodel, tmp_path / "a", example_inputs=3)
    with pytest.raises(ExportError, match=r"^export\.onnx_weight_dtype: 'int4' is unknown; valid: auto, int8, uint8$"):
        export(qmodel, tmp_path / "a", example_inputs=_inputs(0), onnx_weight_dtype="int4")
    assert not any(tmp_path.iterdir())


def test_unsupported_specs_name_the_module(model: nn.Module, tmp_path: Path) -> None:
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w4a16", group_size=8), progress=False)
    # int4 Linear layers go to MatMulNBits (test_onnx_nbits.py); a grouped int4 Conv has no form
    with pytest.raises(ExportError, match=r"module 'conv': weights int4 PerGroup .*no ONNX QDQ form"):
        export(qmodel, tmp_path / "a", example_inputs=_inputs(0))
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a8_dynamic"), progress=False)  # per-token conv input
    with pytest.raises(ExportError, match=r"module 'conv': per-token inputs .* Linear layers"):
        export(qmodel, tmp_path / "b", example_inputs=_inputs(0))


def test_safetensors_without_artifact_module_says_so(static_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ptqkit.export.artifact", None)  # import now raises ModuleNotFoundError
    with pytest.raises(ExportError, match="needs ptqkit.export.artifact.save_artifact"):
        export(static_export[0], tmp_path / "a", formats=("safetensors",))
    assert not (tmp_path / "a").exists()


def test_importing_ptqkit_export_does_not_import_onnx() -> None:
    import subprocess

    code = "import ptqkit, ptqkit.export, sys; print(any(m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class ConvChain(nn.Module):
    """A MobileNetV2-like chain: expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU -> project 1x1, whose
    output is added to the block input (residual), so it has no quantized reader."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 12, 1)
        self.act1 = nn.ReLU6()
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.act2 = nn.ReLU()
        self.project = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.depthwise(self.act1(self.expand(x)))))


def test_conv_chains_fuse_into_qlinearconv_with_the_readers_input_scales(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvChain().eval()
    g = torch.Generator().manual_seed(3)
    calib = pq.CalibrationData.from_tensors(torch.randn(32, 4, 10, 10, generator=g))
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a8"), calib, progress=False)
    x = torch.randn(6, 4, 10, 10, generator=g)
    result = export(qmodel, tmp_path / "chain", example_inputs=(x,))
    kernels = {layer.module: layer.kernel for layer in result.layers}
    # expand and depthwise feed quantized convs through ReLU6 / ReLU: QLinearConv; project feeds the add
    assert kernels == {"expand": "QLinearConv", "depthwise": "QLinearConv", "project": "ConvInteger"}
    assert result.float_layers == ()
    graph = _graph(tmp_path / "chain")
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for layer, reader in (("expand", "depthwise"), ("depthwise", "project")):
        qp = getattr(qmodel, reader).input_quantizer.qparams
        assert float(inits[f"{layer}.output_scale"].reshape(-1)[0]) == qp.scale.reshape(-1)[0].item()  # the reader's own scale
        assert int(inits[f"{layer}.output_zero_point"].reshape(-1)[0]) == qp.zero_point.reshape(-1)[0].item() == 0  # after a ReLU
        bias = inits[f"{layer}.bias_quantized"]
        assert bias.dtype == np.int32
    # ORT requantizes each conv output with its own float multiplier: an output code may differ
    # by one step from the simulation's; the project conv's output moves by one input step times
    # its weights at most per differing code
    with torch.inference_mode():
        ref = qmodel(x).numpy()
    got = run_session(make_session(tmp_path / "chain" / "model.onnx"), (x,))[0]
    step = float(qmodel.project.input_quantizer.qparams.scale.reshape(-1)[0])
    bound = step * float(qmodel.project.weight.abs().sum(dim=(1, 2, 3)).max())
    diff = np.abs(got - ref)
    assert float(np.median(diff)) < 1e-4, float(np.median(diff))  # typical elements: exact
    assert float(diff.max()) <= bound, (float(diff.max()), bound)


class HeadSplit(nn.Module):
    """A Linear whose output only changes layout (attention heads), one whose output a ReLU reads,
    and one whose output goes into a residual Add before a LayerNorm (ORT's SkipLayerNormalization)."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = self.query(x).reshape(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        return heads, torch.relu(self.fc(x)), self.norm(self.out(x) + x)


def test_a_bias_goes_into_matmul_integer_to_float_unless_skip_layer_norm_takes_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = HeadSplit().eval()
    g = torch.Generator().manual_seed(1)
    calib = pq.CalibrationData.from_tensors([torch.randn(5, 16, generator=g) for _ in range(16)])
    qmodel = pq.quantize(model, pq.Recipe.from_preset("w8a8"), calib, progress=False)
    x = torch.randn(3, 5, 16, generator=g)
    result = export(qmodel, tmp_path, example_inputs=x)
    assert {l.module: l.kernel for l in result.layers} == {m: "MatMulIntegerToFloat" for m in ("query", "fc", "out")}
    graph = _graph(tmp_path)
    fused = {n.input[6] for n in graph.node if n.op_type == "MatMulIntegerToFloat" and n.domain == "com.microsoft"}
    assert fused == {"query.bias", "fc.bias"}
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert len(adds) == 2 and any("out.bias" in a.input for a in adds)  # the bias Add and the residual Add
    with torch.inference_mode():
        ref = qmodel(x * 2)
    got = run_session(make_session(tmp_path / "model.onnx"), x * 2)
    assert max(float(np.abs(r.numpy() - o).max()) for r, o in zip(ref, got)) < 1e-4

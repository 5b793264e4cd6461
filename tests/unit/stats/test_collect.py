"""`stats.collect`: input and output taps, stopped forwards, and the paired sources (evaluate's
PairedBatches, the layer engine's Lockstep and LayerForwards) against direct computations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ptqkit.core.errors import CalibrationDataError, NonFiniteError
from ptqkit.stats.collect import Callback, Captured, ModelBatches, collect, first_inputs
from ptqkit.stats.graph_pass import trace
from ptqkit.stats.paired import LayerForwards, Lockstep, PairedBatches
from ptqkit.stats.sequential import calls_from_batches


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).eval()


def _x(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def _per_batch(module: nn.Module, *parts: torch.Tensor) -> torch.Tensor:
    """`module` run batch by batch, as the sources run it (matmul rounding depends on the rows)."""
    with torch.no_grad():
        return torch.cat([module(part) for part in parts])


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_input_and_output_taps_see_the_layer_tensors() -> None:
    model, x = _mlp(), _x()
    seen: dict[str, list] = {"in": [], "out": []}
    statistics = {
        "2": Callback(lambda t: seen["in"].append(t.clone())),
        "4": Callback(lambda t, y: seen["out"].append((t.clone(), y.clone())), "output"),
    }
    samples = collect(model, statistics, ModelBatches([x[:4], x[4:]], max_samples=9, progress=False))
    assert samples == 9
    parts = (x[:4], x[4:9])
    torch.testing.assert_close(torch.cat(seen["in"]), _per_batch(model[:2], *parts), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([t for t, _ in seen["out"]]), _per_batch(model[:4], *parts), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([o for _, o in seen["out"]]), _per_batch(model, *parts), rtol=0, atol=0)
    assert _hook_count(model) == 0


def test_a_stopped_forward_ends_at_the_last_tapped_module() -> None:
    model, x = _mlp(), _x()
    later = []
    handle = model[4].register_forward_pre_hook(lambda m, a: later.append(1))
    captured = Captured("2")
    collect(model, {"2": captured}, ModelBatches([x[:3], x[3:]], max_samples=10, progress=False, stop=True))
    handle.remove()
    assert later == []  # the last layer never ran
    torch.testing.assert_close(captured.tensor(), _per_batch(model[:2], x[:3], x[3:]), rtol=0, atol=0)
    torch.testing.assert_close(first_inputs(model, "2", [x[:3], x[3:]], max_samples=10), captured.tensor(), rtol=0, atol=0)


def test_a_module_never_reached_is_named() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(CalibrationDataError, match="no sample reached the layer 'spare'"):
        first_inputs(Skips(), "spare", [_x()], max_samples=10)


def test_nan_in_an_output_tap_names_the_module_and_batch() -> None:
    def refuse(x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] == 6:  # the second batch only
            raise NonFiniteError("NaN")

    model = _mlp()
    with pytest.raises(CalibrationDataError, match=r"NaN/Inf activation at the output of module '2' in calibration batch 1 \(samples 4-9\)"):
        collect(model, {"2": Callback(refuse, "output")}, ModelBatches([_x(4), _x(6)], max_samples=10, progress=False))
    assert _hook_count(model) == 0


class _Pairs:
    """Paired output statistic recording what it is fed, and calling the reference's layer."""

    tap = "output"

    def __init__(self, reference_layer: nn.Module) -> None:
        self.reference_layer = reference_layer
        self.fed: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []

    def update(self, y_ref: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> None:
        self.reference_layer(x)  # must not replace the pending reference output
        self.fed.append((y_ref, x, y))


def test_paired_batches_hand_the_reference_output_and_the_model_call() -> None:
    reference, model, x = _mlp(0), _mlp(5), _x(10)
    pairs = _Pairs(reference[2])
    outputs = []
    source = PairedBatches(reference, [x[:4], x[4:]], max_samples=10, outputs=lambda r, q, b, first: outputs.append((r, q, first)))
    assert collect(model, {"2": pairs}, source) == 10
    with torch.no_grad():
        for (y_ref, h, y), rows in zip(pairs.fed, (slice(0, 4), slice(4, 10))):
            torch.testing.assert_close(y_ref, reference[:3](x[rows]), rtol=0, atol=0)  # on the reference's own activations
            torch.testing.assert_close(h, model[:2](x[rows]), rtol=0, atol=0)
            torch.testing.assert_close(y, model[:3](x[rows]), rtol=0, atol=0)
        assert [first for _, _, first in outputs] == [0, 4]
        torch.testing.assert_close(outputs[1][0], reference(x[4:]), rtol=0, atol=0)
        torch.testing.assert_close(outputs[1][1], model(x[4:]), rtol=0, atol=0)
    assert _hook_count(model) == 0 and _hook_count(reference) == 0
    with pytest.raises(ValueError, match=r"PairedBatches does not feed input taps; modules \['2'\]"):
        collect(model, {"2": Callback(lambda a, b: None)}, source)


def _halve_weight_pairs(model: nn.Module) -> tuple[dict[str, list], dict[str, Callback]]:
    """Paired input statistics that record (x_ref, x) and halve the model's layer (in place)."""
    fed: dict[str, list] = {}

    def step(name: str):
        def update(x_ref: torch.Tensor, x: torch.Tensor) -> None:
            fed[name] = [x_ref.clone(), x.clone()]
            with torch.no_grad():
                model.get_submodule(name).weight.mul_(0.5)
        return update

    return fed, {name: Callback(step(name)) for name in ("0", "2", "4")}


@pytest.mark.parametrize("kind", ["lockstep", "layer_forwards"])
def test_layer_engine_sources_feed_inputs_after_earlier_layers_changed(kind: str) -> None:
    reference, x = _mlp(0), _x(12)
    model = _mlp(0)
    batches = lambda: [x[:5], x[5:]]  # noqa: E731
    fed, statistics = _halve_weight_pairs(model)
    if kind == "lockstep":
        source = Lockstep(reference, trace(model), calls_from_batches(batches(), 12))
    else:
        source = LayerForwards(reference, batches, 12)
    collect(model, statistics, source)
    changed = _mlp(0)
    for name in ("0", "2", "4"):
        index = int(name)
        torch.testing.assert_close(fed[name][0], _per_batch(reference[:index], *batches()), rtol=0, atol=0)  # the float side, unchanged
        torch.testing.assert_close(fed[name][1], _per_batch(changed[:index], *batches()), rtol=0, atol=0)  # earlier layers already halved
        with torch.no_grad():
            changed[index].weight.mul_(0.5)
    torch.testing.assert_close(model[4].weight, changed[4].weight, rtol=0, atol=0)  # each layer changed once
    with pytest.raises(ValueError, match=f"{type(source).__name__} does not feed output taps"):
        collect(model, {"2": Callback(lambda *a: None, "output")}, source)


def test_collect_refuses_unknown_taps_and_paired_transforms() -> None:
    model, x = _mlp(), _x()
    with pytest.raises(ValueError, match=r"statistic of module '2' taps 'middle'; valid taps: \['input', 'output'\]"):
        collect(model, {"2": Callback(lambda t: None, "middle")}, ModelBatches([x], 10, progress=False))
    with pytest.raises(ValueError, match="transforms apply to single-model input taps; module '2'"):
        collect(model, {"2": Callback(lambda a, b: None)}, LayerForwards(_mlp(), lambda: [x], 10), transforms={"2": torch.abs})

"""MobileNetV2 architecture (torchvision layout) and ImageNet preprocessing vs independent references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ptqkit.core.errors import ConfigError
from ptqkit.models.mobilenet_v2 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InvertedResidual,
    MobileNetV2,
    center_crop,
    imagenet_preprocess,
    resize_shorter_side,
    to_float_chw,
)


def test_architecture_matches_torchvision_state_dict() -> None:
    from ptqkit.models.zoo import mobilenet_v2_weights

    try:
        path = mobilenet_v2_weights()
    except Exception as exc:  # package not installed here
        pytest.skip(str(exc))
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    ours = model.state_dict()
    assert list(ours.keys()) == list(state.keys())  # same names in the same order
    assert all(ours[k].shape == state[k].shape for k in state)
    model.load_state_dict(state, strict=True)
    # torchvision documents 3,504,872 parameters for mobilenet_v2
    assert sum(p.numel() for p in model.parameters()) == 3_504_872


def test_block_structure_and_shapes() -> None:
    model = MobileNetV2().eval()
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17 and len(model.features) == 19
    assert [b.use_res_connect for b in blocks].count(True) == 10  # repeats with stride 1, same width
    assert len(blocks[0].conv) == 3 and all(len(b.conv) == 4 for b in blocks[1:])
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 1000)
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 3, 224, 224))
    assert feats.shape == (1, 1280, 7, 7)


def test_bad_construction() -> None:
    with pytest.raises(ConfigError, match=r"num_classes=0 is invalid"):
        MobileNetV2(num_classes=0)
    with pytest.raises(ConfigError, match=r"stride=3 is invalid; valid strides are 1 and 2"):
        InvertedResidual(8, 8, stride=3, expand_ratio=6)


def test_resize_matches_pil_bilinear_antialias() -> None:
    Image = pytest.importorskip("PIL.Image")
    skdata = pytest.importorskip("skimage.data")
    image = skdata.chelsea()  # [300, 451, 3] uint8
    ours = resize_shorter_side(to_float_chw(image), 256)  # [3, 256, 384]
    assert ours.shape == (3, 256, 384)
    ref = np.asarray(Image.fromarray(image).resize((384, 256), Image.BILINEAR)).astype(np.float32) / 255
    diff = np.abs(ours.permute(1, 2, 0).numpy() - ref)  # [256, 384, 3]
    # PIL rounds to uint8, so the gap is at most one level: measured max 0.99/255, mean 0.30/255
    assert diff.max() <= 1.01 / 255
    assert diff.mean() <= 0.4 / 255


def test_preprocess_center_crop_and_normalization() -> None:
    # a 300x400 image whose value encodes the column: the center crop keeps columns 88..311
    # of the 256x341 resized image
    gray = np.tile(np.linspace(0, 1, 400, dtype=np.float32), (300, 1))  # [300, 400]
    out = imagenet_preprocess(gray)
    assert out.shape == (1, 3, 224, 224)
    resized = resize_shorter_side(to_float_chw(gray), 256)  # [3, 256, 341]
    assert resized.shape == (3, 256, 341)
    expected = (resized[:, 16:240, 58:282] - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)


def test_to_float_chw_inputs_and_errors() -> None:
    rgba = np.full((4, 5, 4), 255, dtype=np.uint8)
    assert torch.equal(to_float_chw(rgba), torch.ones(3, 4, 5))
    assert to_float_chw(np.zeros((4, 5), dtype=bool)).shape == (3, 4, 5)
    with pytest.raises(ConfigError, match=r"image of shape \(4, 5, 2\) is not an image"):
        to_float_chw(np.zeros((4, 5, 2), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"float image has values in \[2, 2\]; expected \[0, 1\]"):
        to_float_chw(np.full((4, 5, 3), 2.0, dtype=np.float32))
    with pytest.raises(ConfigError, match=r"center_crop size=224 is larger than the image \(100x300\)"):
        center_crop(torch.zeros(3, 100, 300), 224)
    with pytest.raises(ConfigError, match=r"imagenet_preprocess got no images"):
        imagenet_preprocess([])
    with pytest.raises(ConfigError, match=r"resize size=0 is invalid"):
        resize_shorter_side(torch.zeros(3, 10, 10), 0)

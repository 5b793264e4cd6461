"""CalibrationData.from_image_folder on PNGs written from scikit-image's bundled photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqkit.calibration import CalibrationData
from ptqkit.calibration.images import describe_transform
from ptqkit.core.errors import CalibrationDataError, ConfigError

Image = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")


def to_tensor_32(image) -> torch.Tensor:
    """PIL RGB -> float [3, 32, 32] in [0, 1] (bilinear resize)."""
    small = image.resize((32, 32), Image.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(
        2, 0, 1
    )  # [H, W, C] -> [C, H, W]


def _crops(photo: np.ndarray, count: int) -> list[np.ndarray]:
    """Deterministic 64x64 crops along the diagonal, alternately flipped."""
    out = []
    for k in range(count):
        y = x = 16 * k
        crop = photo[y : y + 64, x : x + 64]
        out.append(crop[:, ::-1] if k % 2 else crop)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for name, photo, count in (
        ("astronaut", skdata.astronaut(), 6),
        ("coffee", skdata.coffee(), 3),
        ("chelsea", skdata.chelsea(), 3),
    ):
        (root / name).mkdir()
        for k, crop in enumerate(_crops(photo, count)):
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{k:02d}.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(skdata.coffee()[:8, :8]).save(root / ".hidden" / "x.png")
    return root


def test_loads_every_image_in_path_order_with_class_labels(folder: Path) -> None:
    data = CalibrationData.from_image_folder(folder, to_tensor_32, batch_size=5)
    assert len(data) == 12
    assert data.labels == ("astronaut",) * 6 + ("chelsea",) * 3 + ("coffee",) * 3
    assert (
        data.origins[0] == "sample 0 (astronaut/00.png)"
        and data.origins[6] == "sample 6 (chelsea/00.png)"
    )
    batches = list(data.batches())
    assert [tuple(b.shape) for b in batches] == [(5, 3, 32, 32), (5, 3, 32, 32), (2, 3, 32, 32)]
    # PNG is lossless: sample 1 is the flipped second astronaut crop, resized the same way
    crop = np.ascontiguousarray(_crops(skdata.astronaut(), 2)[1])
    torch.testing.assert_close(batches[0][1], to_tensor_32(Image.fromarray(crop)), rtol=0, atol=0)
    d = data.description
    assert d["preprocessing"] == {
        "kind": "image",
        "mode": "RGB",
        "transform": f"{__name__}.to_tensor_32",
        "pad_id": 0,
        "pad_values": {"attention_mask": 0},
    }
    json.dumps(d)


def test_stratified_by_folder_keeps_shares_and_is_seeded(folder: Path) -> None:
    a = CalibrationData.from_image_folder(folder, to_tensor_32, limit=4, seed=0)
    assert sorted(a.labels) == ["astronaut", "astronaut", "chelsea", "coffee"]
    assert a.description["sampling"]["classes"] == {"astronaut": 2, "chelsea": 1, "coffee": 1}
    b = CalibrationData.from_image_folder(folder, to_tensor_32, limit=4, seed=0)
    assert a.fingerprint == b.fingerprint and a.origins == b.origins
    seeds = {
        CalibrationData.from_image_folder(folder, to_tensor_32, limit=4, seed=s).origins
        for s in range(4)
    }
    assert len(seeds) > 1
    flat = CalibrationData.from_image_folder(
        folder, to_tensor_32, limit=4, seed=0, stratify_by_folder=False
    )
    assert flat.description["sampling"]["method"] == "random" and len(flat) == 4


def test_only_chosen_files_are_decoded(folder: Path, tmp_path: Path) -> None:
    calls = []

    def spy(image):
        calls.append(image.size)
        return to_tensor_32(image)

    CalibrationData.from_image_folder(folder, spy, limit=3, seed=1)
    assert len(calls) == 3


def test_flat_folder_and_grayscale_mode(tmp_path: Path) -> None:
    for k, crop in enumerate(_crops(skdata.chelsea(), 2)):
        Image.fromarray(np.ascontiguousarray(crop)).save(tmp_path / f"c{k}.png")
    data = CalibrationData.from_image_folder(
        tmp_path, lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32))[None], mode="L"
    )
    assert data.labels == ("", "") and next(data.batches()).shape == (2, 1, 64, 64)
    assert data.description["preprocessing"]["transform"].endswith("<lambda>")


def test_describe_transform_is_stable() -> None:
    class Resize:
        def __init__(self, size: int) -> None:
            self.size = size

        def __call__(self, image):
            return image

        def __repr__(self) -> str:
            return f"Resize(size={self.size})"

    class Plain:
        def __call__(self, image):
            return image

    assert describe_transform(Resize(32)) == "Resize(size=32)"
    assert "0x" not in describe_transform(Plain()) and describe_transform(
        Plain()
    ) == describe_transform(Plain())
    assert describe_transform(to_tensor_32) == f"{__name__}.to_tensor_32"


def test_image_errors(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match=r"image folder '.*missing' is not a directory"):
        CalibrationData.from_image_folder(tmp_path / "missing", to_tensor_32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CalibrationDataError, match=r"calibration data is empty: no image files \(.png, .jpg"
    ):
        CalibrationData.from_image_folder(tmp_path / "empty", to_tensor_32)
    with pytest.raises(
        CalibrationDataError,
        match=r"sample 0 \(astronaut/00.png\): transform returned a ndarray .* must return a Tensor",
    ):
        CalibrationData.from_image_folder(folder, lambda im: np.asarray(im))
    with pytest.raises(
        CalibrationDataError,
        match=r"sample 0 \(astronaut/00.png\): transform failed on .*00.png: ZeroDivisionError",
    ):
        CalibrationData.from_image_folder(folder, lambda im: 1 / 0)
    with pytest.raises(ConfigError, match=r"transform='resize' is not callable"):
        CalibrationData.from_image_folder(folder, "resize")

    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(_crops(skdata.coffee(), 1)[0])).save(
        broken / "a" / "ok.png"
    )
    (broken / "a" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(
        CalibrationDataError, match=r"sample 1 \(a/zz.png\): cannot decode .*zz.png as an image"
    ):
        CalibrationData.from_image_folder(broken, to_tensor_32)


def test_nan_from_transform_names_the_file(folder: Path) -> None:
    def poison_chelsea(image):
        t = to_tensor_32(image)
        return t * float("nan") if abs(float(t.mean()) - chelsea_mean) < 1e-6 else t

    chelsea_mean = float(
        to_tensor_32(Image.open(folder / "chelsea" / "01.png").convert("RGB")).mean()
    )
    with pytest.raises(
        CalibrationDataError,
        match=r"calibration sample 7 \(chelsea/01.png\) holds 3072 NaN/Inf value\(s\)",
    ):
        CalibrationData.from_image_folder(folder, poison_chelsea)

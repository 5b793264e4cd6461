"""Finding, decoding and transforming calibration images (PIL is imported only when decoding)."""

from __future__ import annotations

import os
import re
import types
from pathlib import Path
from typing import Any, Callable

import torch

from ptqkit.core.errors import CalibrationDataError, ConfigError

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image", "describe_transform", "prepare_images"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(root: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """(file, class) for every image under `root`, sorted by relative path.

    The class is the first-level sub-folder a file lies in ("" for files directly in `root`);
    sub-folders are searched recursively. Hidden files and folders (leading '.') are skipped.
    """
    base = Path(root)
    if not base.is_dir():
        raise CalibrationDataError(
            f"image folder {os.fspath(root)!r} is not a directory; pass a folder of images or of class sub-folders"
        )
    found: list[tuple[Path, str]] = []
    for path in sorted(base.rglob("*"), key=lambda p: p.relative_to(base).as_posix()):
        rel = path.relative_to(base)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.append((path, rel.parts[0] if len(rel.parts) > 1 else ""))
    if not found:
        raise CalibrationDataError(
            f"calibration data is empty: no image files ({', '.join(IMAGE_SUFFIXES)}) under {os.fspath(root)!r}"
        )
    return found


def load_image(
    path: Path, transform: Callable[[Any], Any], mode: str | None, origin: str
) -> torch.Tensor:
    """Decode one image with PIL, convert it to `mode` (None keeps the file's), apply `transform`."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as err:  # pragma: no cover - pillow ships with the dev extras
        raise ImportError("from_image_folder needs pillow: pip install pillow") from err
    try:
        with Image.open(path) as image:
            image.load()
            picture = image.convert(mode) if mode is not None else image.copy()
    except Image.DecompressionBombError as err:  # PIL's pixel limit (Image.MAX_IMAGE_PIXELS x 2)
        raise CalibrationDataError(
            f"calibration {origin}: {path} is too large to decode ({err}); resize it first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:  # PIL's parsers raise these for a corrupt file
        raise CalibrationDataError(
            f"calibration {origin}: cannot decode {path} as an image ({type(err).__name__}: {err})"
        ) from None
    try:
        out = transform(picture)
    except Exception as err:  # the user's transform: report which file it failed on
        raise CalibrationDataError(
            f"calibration {origin}: transform failed on {path}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor):
        raise CalibrationDataError(
            f"calibration {origin}: transform returned a {type(out).__name__} for {path}; it must return a Tensor [C, H, W]"
        )
    return out


def describe_transform(transform: Callable[..., Any]) -> str:
    """A stable text for a transform: `module.qualname` for functions, else its repr.

    Memory addresses (' at 0x7f...'), which default reprs carry, are removed so that the
    description (and the fingerprint built on it) is the same from run to run.
    """
    if isinstance(transform, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"{transform.__module__}.{transform.__qualname__}"
    return _ADDRESS.sub("", repr(transform))


def prepare_images(
    path: str | os.PathLike[str],
    transform: Callable[[Any], Any],
    *,
    limit: int | None,
    seed: int,
    stratify_by_folder: bool,
    mode: str | None,
) -> dict[str, Any]:
    """List, sample (stratified by class folder when asked) and decode images.

    Returns the CalibrationData arguments: samples, labels, origins, source, sampling_info,
    preprocessing. Only the chosen files are decoded.
    """
    from ptqkit.calibration.sampling import choose

    if not callable(transform):
        raise ConfigError(
            f"transform={transform!r} is not callable; pass a function PIL.Image -> Tensor [C, H, W]"
        )
    files = list_images(path)
    labels = [label for _, label in files]
    strata = labels if stratify_by_folder and len(set(labels)) > 1 else None
    index, info = choose(len(files), limit, seed, strata)
    root = os.fspath(path)
    origins = [f"sample {i} ({Path(files[i][0]).relative_to(root).as_posix()})" for i in index]
    return {
        "samples": [load_image(files[i][0], transform, mode, o) for i, o in zip(index, origins)],
        "labels": [labels[i] for i in index],
        "origins": origins,
        "source": f"image folder: {root}",
        "sampling_info": info,
        "preprocessing": {
            "kind": "image",
            "mode": mode,
            "transform": describe_transform(transform),
        },
    }

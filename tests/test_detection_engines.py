"""Both engines behind DETECT_ENGINE find the same faces through the platform's resolution
policy: the ONNX engine (default) and the mtcnn package with compiled networks."""

import pytest

from tests.conftest import PHOTOS
from workers import detection
from workers.onnx_engine import OnnxDetector

PHOTOS_TO_COMPARE = ["vlad_sample1.jpg", "vlad_sample3.jpg", "clm_audrey.jpg", "skimage_camera.png", "opencv_home.jpg"]


@pytest.fixture(scope="module")
def engines(onnx_models):
    return detection.Detector(threads=1), OnnxDetector(onnx_models, threads=1)


@pytest.mark.parametrize("name", PHOTOS_TO_COMPARE)
def test_the_engines_agree(engines, name):
    image = detection.load_upright_rgb((PHOTOS / name).read_bytes())
    tf_faces, onnx_faces = (detection.find_faces(image, 20, 0.9, max_side=1024, detector=e) for e in engines)

    assert len(tf_faces) == len(onnx_faces)
    for a, b in zip(tf_faces, onnx_faces, strict=True):
        assert a["box"] == pytest.approx(b["box"], abs=2)
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-3)


def test_the_setting_picks_the_engine(settings, monkeypatch):
    monkeypatch.setattr(detection, "_detector", None)
    settings.DETECT_ENGINE = "onnx"
    assert isinstance(detection.get_detector(), OnnxDetector)
    monkeypatch.setattr(detection, "_detector", None)
    settings.DETECT_ENGINE = "tensorflow"
    assert isinstance(detection.get_detector(), detection.Detector)

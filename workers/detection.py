"""Face detection with the `mtcnn` package, loaded once per worker process.

The detector is created lazily in the process that uses it (never in a Celery parent before the
pool forks: TensorFlow hangs in the children). DETECT_ENGINE picks it: `onnx` (the default,
workers/onnx_engine.py) runs MTCNN's own networks, exported at install time, on ONNX Runtime;
`tensorflow` runs the mtcnn package with each of its three networks compiled as one graph with open
input shapes, which is faster than Keras' layer-by-layer eager calls and, because nothing is
retraced per image size, keeps memory flat in a long-running worker.

Resolution policy: photos are downscaled so their long side is at most DETECT_MAX_SIDE before
detection, and boxes and keypoints are mapped back to the original's pixels. MTCNN cannot look
for faces under 12 px of the detection image, so on a 1920-px photo scaled to 1024 px the smallest
findable face is about 23 px of the original. A `min_face_size` above 20 is honoured by
downscaling further (mtcnn itself returns nothing for 30 or more).
"""

import io
import os
import threading
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps
from django.conf import settings

KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# MTCNN's smallest window, and the largest min_face_size mtcnn 1.0.0 handles correctly.
MTCNN_WINDOW = 12
MTCNN_MAX_MIN_FACE = 20

# TensorFlow's C++ info lines (oneDNN, CPU features, the package's swallowed "no faces" errors)
# drown the worker's own log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_lock = threading.Lock()
_detector = None


class UndecodableImage(Exception):
    """The stored bytes are not an image Pillow can decode."""


@dataclass(frozen=True)
class Plan:
    """How one photo is scaled for MTCNN."""

    scale: float
    mtcnn_min_face_size: float


def plan(width, height, min_face_size, max_side):
    """Choose the detection scale and MTCNN's min_face_size for a photo and a requested minimum."""
    scale = min(1.0, max_side / max(width, height))
    effective = min_face_size * scale
    if effective > MTCNN_MAX_MIN_FACE:
        scale *= MTCNN_MAX_MIN_FACE / effective
        effective = MTCNN_MAX_MIN_FACE
    return Plan(scale=scale, mtcnn_min_face_size=max(float(MTCNN_WINDOW), effective))


def load_upright_rgb(data):
    """Decode bytes to an upright (EXIF orientation applied) RGB Pillow image."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
        # In place: a photo with no orientation to apply is used as decoded, not copied (twice,
        # with convert): half the decode time of a 1920-px JPEG, 25 -> 12 ms.
        PIL.ImageOps.exif_transpose(image, in_place=True)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as error:
        raise UndecodableImage(str(error)) from error


class Detector:
    """MTCNN with its networks compiled once; `detect` takes an RGB uint8 array."""

    def __init__(self, threads=1):
        import tensorflow as tf  # heavy: imported only where detection runs

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        from mtcnn import MTCNN

        self._tf = tf
        self._mtcnn = MTCNN()
        image_spec = [None, None, None, 3]
        for stage, shape in zip(self._mtcnn.stages, (image_spec, [None, 24, 24, 3], [None, 48, 48, 3]), strict=True):
            stage._model = tf.function(stage._model, input_signature=[tf.TensorSpec(shape, tf.float32)])

    def detect(self, rgb, min_face_size=20.0):
        """Raw MTCNN results for one image, as plain Python numbers."""
        raw = self._mtcnn.detect_faces(rgb, min_face_size=min_face_size)
        return [
            {
                "box": [float(v) for v in face["box"]],
                "confidence": float(face["confidence"]),
                "keypoints": {name: [float(v) for v in face["keypoints"][name]] for name in KEYPOINTS},
            }
            for face in raw
        ]


def get_detector():
    """The process's detector, of the DETECT_ENGINE setting, created on first use."""
    global _detector
    if _detector is None:
        with _lock:
            if _detector is None:
                if settings.DETECT_ENGINE == "onnx":
                    from .onnx_engine import OnnxDetector

                    _detector = OnnxDetector(settings.ONNX_MODEL_DIR, threads=settings.DETECT_THREADS)
                else:
                    _detector = Detector(threads=settings.DETECT_THREADS)
    return _detector


def find_faces(image, min_face_size=20, min_confidence=0.9, max_side=None, detector=None):
    """Faces in an upright RGB Pillow image, in its own pixels, strongest first."""
    detector = detector or get_detector()
    width, height = image.size
    how = plan(width, height, min_face_size, max_side or settings.DETECT_MAX_SIDE)
    if how.scale < 1.0:
        size = (max(1, round(width * how.scale)), max(1, round(height * how.scale)))
        small = image.resize(size, PIL.Image.Resampling.BILINEAR, reducing_gap=2.0)
    else:
        small = image
    # The scale actually applied on each axis, after rounding to whole pixels.
    sx, sy = width / small.size[0], height / small.size[1]

    faces = []
    for raw in detector.detect(np.asarray(small), min_face_size=how.mtcnn_min_face_size):
        if raw["confidence"] < min_confidence:
            continue
        x, y, w, h = raw["box"]
        x0, y0 = _clip(x * sx, width), _clip(y * sy, height)
        x1, y1 = _clip((x + w) * sx, width), _clip((y + h) * sy, height)
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        faces.append(
            {
                "box": {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0},
                "confidence": raw["confidence"],
                "keypoints": {
                    name: [_clip(px * sx, width - 1), _clip(py * sy, height - 1)]
                    for name, (px, py) in raw["keypoints"].items()
                },
            }
        )
    faces.sort(key=lambda face: face["confidence"], reverse=True)
    return faces


def _clip(value, limit):
    return int(min(max(round(value), 0), limit))

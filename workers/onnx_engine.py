"""MTCNN on ONNX Runtime: the `mtcnn` package's networks and pipeline, without TensorFlow.

`OnnxDetector(model_dir, threads=1).detect(rgb, min_face_size=20.0)` has the contract of
`workers.detection.Detector.detect`: it takes an RGB uint8 array [H, W, 3] and returns
`[{"box": [x, y, w, h], "confidence": c, "keypoints": {"left_eye": [x, y], ...}}]` as plain floats
in the pixels of that array, strongest first, exactly as mtcnn 1.0.0's `detect_faces` would (its
boxes and keypoints are rounded to whole pixels, boxes clipped to the image, landmarks not).

`model_dir` holds pnet.onnx, rnet.onnx and onet.onnx written by `python -m workers.onnx_export`
from the package's own weights (at build time: this module needs only numpy and onnxruntime).

What is copied from mtcnn 1.0.0 (MIT License, Copyright (c) 2019-2024 Iván de Paz Centeno), so
that the detections are the package's:
- the scale pyramid: `round(-(log(min_side / 12) / log(0.709) + 1))` levels of scale
  `12 / min_face_size * 0.709**k`, each level `int(h * scale) x int(w * scale)`, each resized from
  the full normalised image ((v - 127.5) / 128) with TensorFlow's AREA method (exact box
  averaging with fractional edge weights), re-implemented here with an integral image;
- P-Net box generation (stride 2, 12-px cell, boxes at `2 * i` .. `2 * i + 12` plus regression),
  per-level NMS (IoU 0.5) and cross-level NMS (0.7), squaring;
- R-Net / O-Net patches as `tf.image.crop_and_resize` cuts them (bilinear, boxes normalised by
  the image size but sampled over size - 1, zeros outside the image), refinement, thresholds
  0.6 / 0.7 / 0.8, landmark decoding, O-Net's "min" NMS;
- the package's unusual NMS: a box is dropped when any higher-scored box overlaps it by more than
  the threshold, even one that was itself dropped;
- the package's swallowed error: when a pyramid level is under 11 px on a side (P-Net cannot run
  on it; only happens for min_face_size above about 20) mtcnn returns no faces at all, and so
  does this.
"""

import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
MODEL_FILES = {"pnet": "pnet.onnx", "rnet": "rnet.onnx", "onet": "onet.onnx"}

# mtcnn 1.0.0's defaults (StagePNet / StageRNet / StageONet keyword arguments).
MIN_SIZE = 12
SCALE_FACTOR = 0.709
THRESHOLD_PNET, NMS_PNET1, NMS_PNET2 = 0.6, 0.5, 0.7
THRESHOLD_RNET, NMS_RNET = 0.7, 0.7
THRESHOLD_ONET, NMS_ONET = 0.8, 0.7
# P-Net (3x3 conv, 2x2 "same" pool, two 3x3 convs) fails on inputs under 11 px: TensorFlow raises,
# and mtcnn's detect_faces swallows the error and returns [].
PNET_MIN_INPUT = 11
# Column-chunk size for the NMS pair matrix: bounds memory at about 8 * N * chunk bytes per array
# (the package builds the whole N x N matrix).
NMS_CHUNK = 256
# The pyramid's summed-area table (24 bytes a pixel) is kept between images up to this size
# (a 1024 x 768 photo needs 19 MB); a larger one is freed after use.
KEEP_TABLE_BYTES = 32 << 20


def session_options(threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A memory pattern is planned and kept for every input shape, and P-Net sees a new shape at
    # every pyramid scale of every photo size: with it a process crept from 679 to 755 MB over
    # 480 images of 40 sizes, without it stayed at 618-624 MB, at the same speed (measured side
    # by side in one process: 135.8 vs 132.6 ms CPU per photo).
    options.enable_mem_pattern = False
    # Spinning threads burn a core waiting for work: with 2 threads small photos get slower, and
    # on a shared machine the spin steals time from the other worker.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxDetector:
    """MTCNN (the mtcnn package's weights and pipeline) on ONNX Runtime; no TensorFlow."""

    def __init__(self, model_dir, threads=1):
        model_dir = Path(model_dir)
        missing = [name for name in MODEL_FILES.values() if not (model_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{model_dir}: missing {', '.join(missing)}; run `python -m workers.onnx_export {model_dir}`"
            )
        options = session_options(threads)
        self._sessions = {
            name: ort.InferenceSession(str(model_dir / filename), options, providers=["CPUExecutionProvider"])
            for name, filename in MODEL_FILES.items()
        }
        self.model_dir = model_dir
        self.threads = threads
        self._pyramid = AreaPyramid()
        self._lock = threading.Lock()

    # ---- the public contract -------------------------------------------------------------------

    def detect(self, rgb, min_face_size=20.0):
        """Faces in an RGB uint8 array, as `workers.detection.Detector.detect` returns them."""
        bboxes = self.detect_raw(rgb, min_face_size=min_face_size)
        return [_to_json(row) for row in bboxes]

    def detect_raw(self, rgb, min_face_size=20.0):
        """The package's final array, unrounded: rows [0, x1, y1, x2, y2, conf, x1..x5, y1..y5],
        boxes clipped to the image (detect_faces(..., output_type="numpy", box_format="xyxy"))."""
        image = _as_rgb(rgb)
        if min(image.shape[:2]) < 1:
            return np.empty((0, 16))
        with self._lock:  # the pyramid's buffer is per detector
            try:
                bboxes = self._stage_pnet(image, min_face_size)
            finally:
                self._pyramid.release(keep_bytes=KEEP_TABLE_BYTES)
            if bboxes is None or len(bboxes) == 0:
                return np.empty((0, 16))
            pixels = image.astype(np.float32)  # read by R-Net's and O-Net's patch cutting
            bboxes = self._stage_rnet(pixels, bboxes)
            if len(bboxes) == 0:
                return np.empty((0, 16))
            bboxes = self._stage_onet(pixels, bboxes)
            if len(bboxes) == 0:
                return np.empty((0, 16))
        return _limit_bboxes(bboxes, *image.shape[:2])

    # ---- stages ----------------------------------------------------------------------------------

    def _stage_pnet(self, image, min_face_size):
        height, width = image.shape[:2]
        scales = build_scale_pyramid(width, height, min_face_size)
        shapes = [(np.asarray([height, width]) * scale).astype(np.int64) for scale in scales]
        if any(min(shape) < PNET_MIN_INPUT for shape in shapes):
            return None  # mtcnn: TensorFlow raises inside, detect_faces returns []
        if shapes:
            self._pyramid.build(image)
        session = self._sessions["pnet"]
        per_level = []
        for scale, (level_h, level_w) in zip(scales, shapes, strict=True):
            level = self._pyramid.level(int(level_h), int(level_w))
            bbox_reg, bbox_class = session.run(None, {"input": level[None]})
            proposals = generate_bounding_box(bbox_reg, bbox_class, THRESHOLD_PNET)
            proposals[:, 1:5] = proposals[:, 1:5] / scale  # upscale_bboxes, one image
            per_level.append(smart_nms(proposals, NMS_PNET1, method="union", initial_sort=False))
        bboxes = np.concatenate(per_level, axis=0) if per_level else np.empty((0, 6))
        bboxes = smart_nms(bboxes, NMS_PNET2, method="union", initial_sort=True)
        return resize_to_square(bboxes)

    def _stage_rnet(self, image, bboxes):
        patches = extract_patches(image, bboxes, 24)
        offsets, scores = self._sessions["rnet"].run(None, {"input": patches})
        bboxes = bboxes.copy()
        bboxes[:, -1] = scores[:, -1]
        bboxes = adjust_bboxes(bboxes, offsets)
        bboxes = bboxes[np.where(bboxes[:, -1] > THRESHOLD_RNET)[0]]
        bboxes = smart_nms(bboxes, NMS_RNET, method="union", initial_sort=True)
        return resize_to_square(bboxes)

    def _stage_onet(self, image, bboxes):
        patches = extract_patches(image, bboxes, 48)
        offsets, landmarks, scores = self._sessions["onet"].run(None, {"input": patches})
        landmarks = adjust_landmarks(landmarks, bboxes)
        bboxes = bboxes.copy()
        bboxes[:, -1] = scores[:, -1]
        bboxes = adjust_bboxes(bboxes, offsets)
        bboxes = np.concatenate([bboxes, landmarks], axis=-1)
        bboxes = bboxes[np.where(bboxes[:, 5] > THRESHOLD_ONET)[0]]
        return smart_nms(bboxes, NMS_ONET, method="min", initial_sort=True)


# ---- image helpers -------------------------------------------------------------------------------


def _as_rgb(rgb):
    image = np.asarray(rgb)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image array [H, W, 3], got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def build_scale_pyramid(width, height, min_face_size, scale_factor=SCALE_FACTOR, min_size=MIN_SIZE):
    """mtcnn.utils.images.build_scale_pyramid, verbatim."""
    min_dim = min(width, height)
    scales_count = round(-((np.log(min_dim / min_size) / np.log(scale_factor)) + 1))
    m = min_size / min_face_size
    return m * scale_factor ** np.arange(scales_count)


class AreaPyramid:
    """The image's pyramid levels as tf.image.resize(..., method=AREA) makes them.

    TensorFlow's AREA resize (align_corners=False) averages the source over the output pixel's
    footprint [r*sy, (r+1)*sy) x [c*sx, (c+1)*sx), sy = H / out_h and sx = W / out_w in float32,
    with fractional weights for partly covered source pixels and reads past the last row/column
    clamped to the edge. The integral of a piecewise-constant image is bilinear inside each pixel,
    so each level is the 2-D difference of the summed-area table read at the footprint corners by
    bilinear interpolation. The table (float64, of 2 * v - 255 so that it holds whole numbers) is
    built once per image; each level then costs a few passes over its own output only, worked in
    cache-sized blocks of rows. Agrees with TensorFlow within about 1e-6.

    Not thread-safe: the table's buffer is reused from image to image.
    """

    BLOCK_BYTES = 1 << 18

    def __init__(self):
        self._buffer = None

    def build(self, rgb):
        height, width, channels = rgb.shape
        size = (height + 2) * (width + 2) * channels
        if self._buffer is None or self._buffer.size < size:
            self._buffer = np.empty(size, dtype=np.float64)
        table = self._buffer[:size].reshape(height + 2, width + 2, channels)
        table[0] = 0.0
        table[:, 0] = 0.0
        step = max(1, self.BLOCK_BYTES // (8 * (width + 2) * channels))
        for start in range(0, height, step):
            stop = min(height, start + step)
            block = table[1 + start : 1 + stop, 1:]
            np.multiply(rgb[start:stop], 2.0, out=block[:, :width])
            block[:, :width] -= 255.0
            block[:, width] = block[:, width - 1]  # edge column
            np.cumsum(block, axis=1, out=block)
            for row in range(1 + start, 1 + stop):
                table[row] += table[row - 1]
        table[height + 1, 1:] = table[height, 1:] + (table[height, 1:] - table[height - 1, 1:])  # edge row
        self._table, self._height, self._width = table, height, width
        self._flat = table.reshape(-1, channels)
        self._image = rgb
        return self

    def release(self, keep_bytes=0):
        """Drop the table's buffer if it is larger than keep_bytes."""
        self._table = self._flat = self._image = None
        if self._buffer is not None and self._buffer.nbytes > keep_bytes:
            self._buffer = None

    def level(self, out_h, out_w):
        """The image resized to out_h x out_w, float32 [out_h, out_w, C], normalised."""
        height, width, flat = self._height, self._width, self._flat
        channels = flat.shape[1]
        f32 = np.float32
        if (out_h, out_w) == (height, width):
            # Scale 1 (min_face_size 12): each output pixel is its own source pixel.
            return (self._image.astype(f32) - f32(127.5)) / f32(128)
        sy = f32(height) / f32(out_h)
        sx = f32(width) / f32(out_w)
        ys = np.arange(out_h + 1, dtype=f32) * sy
        xs = np.arange(out_w + 1, dtype=f32) * sx
        iy = np.floor(ys).astype(np.intp)
        ix = np.floor(xs).astype(np.intp)
        fy = (ys - iy).astype(np.float64)
        fx = (xs - ix).astype(np.float64)[None, :, None]
        # 2 * v - 255 = 256 * normalised value; divide by the footprint's area too.
        scale = 1.0 / (256.0 * float(sy) * float(sx))
        stride = width + 2
        out = np.empty((out_h, out_w, channels), dtype=f32)
        step = max(1, self.BLOCK_BYTES // (8 * (out_w + 1) * channels))
        for start in range(0, out_h, step):
            stop = min(out_h, start + step)
            rows = slice(start, stop + 1)  # footprint corners of output rows start..stop-1
            corner = (iy[rows] * stride)[:, None] + ix[None, :]
            # The table at the corners: columns ix + fx on rows iy and iy + 1, then rows iy + fy.
            upper = flat.take(corner + 1, axis=0)
            q = flat.take(corner, axis=0)
            upper -= q
            upper *= fx
            upper += q
            lower = flat.take(corner + (stride + 1), axis=0)
            q = flat.take(corner + stride, axis=0)
            lower -= q
            lower *= fx
            lower += q
            lower -= upper
            lower *= fy[rows, None, None]
            lower += upper
            across = lower[:, 1:] - lower[:, :-1]
            np.multiply(across[1:] - across[:-1], scale, out=out[start:stop], casting="same_kind")
        return out


def extract_patches(image, bboxes, size):
    """tf.image.crop_and_resize(normalised[None], boxes / [H, W, H, W], (size, size)), bilinear.

    `image` is the RGB array (uint8, or float32 pixel values 0..255); boxes are columns 1..4 of
    `bboxes` (x1, y1, x2, y2 in pixels). As in TensorFlow's kernel, boxes are normalised by the
    image size and then sampled over (size - 1) steps of the normalised box times (H - 1);
    samples outside [0, H - 1] x [0, W - 1] are 0; arithmetic in float32.
    """
    height, width, channels = image.shape
    f32 = np.float32
    y1 = (bboxes[:, 2] / height).astype(f32)[:, None]
    x1 = (bboxes[:, 1] / width).astype(f32)[:, None]
    y2 = (bboxes[:, 4] / height).astype(f32)[:, None]
    x2 = (bboxes[:, 3] / width).astype(f32)[:, None]
    steps = np.arange(size, dtype=f32)[None, :]
    height_scale = (y2 - y1) * f32(height - 1) / f32(size - 1)
    width_scale = (x2 - x1) * f32(width - 1) / f32(size - 1)
    in_y = y1 * f32(height - 1) + steps * height_scale  # [N, size]
    in_x = x1 * f32(width - 1) + steps * width_scale
    valid = ((in_y >= 0) & (in_y <= height - 1))[:, :, None] & ((in_x >= 0) & (in_x <= width - 1))[:, None, :]

    top = np.floor(in_y)
    left = np.floor(in_x)
    y_lerp = (in_y - top)[:, :, None, None]
    x_lerp = (in_x - left)[:, None, :, None]
    top_row = np.clip(top, 0, height - 1).astype(np.intp)[:, :, None] * width
    bottom_row = np.clip(np.ceil(in_y), 0, height - 1).astype(np.intp)[:, :, None] * width
    left_col = np.clip(left, 0, width - 1).astype(np.intp)[:, None, :]
    right_col = np.clip(np.ceil(in_x), 0, width - 1).astype(np.intp)[:, None, :]

    # Interpolate the pixel values, then normalise: the same up to float rounding (~1e-7).
    pixels = (image if image.dtype == f32 else image.astype(f32)).reshape(-1, channels)
    top_left = pixels.take(top_row + left_col, axis=0)
    top_values = pixels.take(top_row + right_col, axis=0)
    top_values -= top_left
    top_values *= x_lerp
    top_values += top_left
    bottom_left = pixels.take(bottom_row + left_col, axis=0)
    patches = pixels.take(bottom_row + right_col, axis=0)
    patches -= bottom_left
    patches *= x_lerp
    patches += bottom_left
    patches -= top_values
    patches *= y_lerp
    patches += top_values
    patches -= f32(127.5)
    patches /= f32(128)
    patches *= valid[:, :, :, None]  # TensorFlow's extrapolation value 0 outside the image
    return patches


# ---- boxes (mtcnn.utils.bboxes / landmarks, same arithmetic) -------------------------------------


def generate_bounding_box(bbox_reg, bbox_class, threshold_face, strides=2, cell_size=12):
    """mtcnn.utils.bboxes.generate_bounding_box on numpy outputs."""
    confidence_score = bbox_class[:, :, :, 1]
    index_bboxes = np.stack(np.where(confidence_score > threshold_face))  # batch, y, x
    filtered_bbox_reg = np.transpose(bbox_reg[index_bboxes[0], index_bboxes[1], index_bboxes[2]], (1, 0))
    reg_x1, reg_y1, reg_x2, reg_y2 = filtered_bbox_reg
    strides = np.asarray([[1], [strides], [strides]])
    cellsize = [np.asarray([[0], [1], [1]]), np.asarray([[0], [cell_size], [cell_size]])]
    bbox_up_left = index_bboxes * strides + cellsize[0]
    bbox_bottom_right = index_bboxes * strides + cellsize[1]
    reg_w = bbox_bottom_right[2] - bbox_up_left[2]
    reg_h = bbox_bottom_right[1] - bbox_up_left[1]
    x1 = bbox_up_left[2] + reg_x1 * reg_w
    y1 = bbox_up_left[1] + reg_y1 * reg_h
    x2 = bbox_bottom_right[2] + reg_x2 * reg_w
    y2 = bbox_bottom_right[1] + reg_y2 * reg_h
    bboxes = np.stack(
        [index_bboxes[0], x1, y1, x2, y2, confidence_score[index_bboxes[0], index_bboxes[1], index_bboxes[2]]],
        axis=0,
    ).T
    return _sort_descending(bboxes, bboxes[:, -1])


def _sort_descending(array, scores):
    """mtcnn's sort_by_scores(..., ascending=False): argsort (default kind) reversed."""
    return array[np.argsort(scores)[::-1]]


def _nms_keep(boxes, threshold, method):
    """Indices kept by mtcnn's nms(iou(boxes, method), threshold), computed in column chunks.

    Box j is kept when no box i < j has IoU(i, j) > threshold (dropped boxes still suppress).
    The IoU expression is the package's, term for term, so the comparisons come out the same.
    """
    count = len(boxes)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = np.ones(count, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(1, count, NMS_CHUNK):
            stop = min(count, start + NMS_CHUNK)
            a = boxes[None, start:stop]  # columns j
            b = boxes[:stop, None]  # rows i (only i < stop can precede a j in this chunk)
            height_inter = np.maximum(0, np.minimum(a[:, :, 2], b[:, :, 2]) - np.maximum(a[:, :, 0], b[:, :, 0]))
            width_inter = np.maximum(0, np.minimum(a[:, :, 3], b[:, :, 3]) - np.maximum(a[:, :, 1], b[:, :, 1]))
            area_inter = height_inter * width_inter
            if method == "union":
                overlap = area_inter / (area[:stop, None] + area[None, start:stop] - area_inter)
            elif method == "min":
                overlap = area_inter / np.minimum(area[:stop, None], area[None, start:stop])
            else:
                raise ValueError("Method should be either 'union' or 'min'.")
            earlier = np.arange(stop)[:, None] < np.arange(start, stop)[None, :]
            keep[start:stop] = ~((overlap > threshold) & earlier).any(axis=0)
    return np.flatnonzero(keep)


def smart_nms(bboxes, threshold, method="union", initial_sort=True):
    """mtcnn.utils.bboxes.smart_nms_from_bboxes for one image (column 0 all zeros)."""
    if initial_sort:
        bboxes = _sort_descending(bboxes, bboxes[:, 5])
    if len(bboxes) == 0:
        return np.empty((0, 6))
    return bboxes[_nms_keep(bboxes[:, 1:5], threshold, method)]


def resize_to_square(bboxes):
    """mtcnn.utils.bboxes.resize_to_square."""
    bboxes = bboxes.copy()
    h = bboxes[:, 4] - bboxes[:, 2]
    w = bboxes[:, 3] - bboxes[:, 1]
    largest_size = np.maximum(w, h)
    bboxes[:, 1] = bboxes[:, 1] + w * 0.5 - largest_size * 0.5
    bboxes[:, 2] = bboxes[:, 2] + h * 0.5 - largest_size * 0.5
    bboxes[:, 3:5] = bboxes[:, 1:3] + np.tile(largest_size, (2, 1)).T
    return bboxes


def adjust_bboxes(bboxes, offsets):
    """mtcnn.utils.bboxes.adjust_bboxes."""
    bboxes = bboxes.copy()
    w = bboxes[:, 3] - bboxes[:, 1] + 1
    h = bboxes[:, 4] - bboxes[:, 2] + 1
    bboxes[:, 1:5] += offsets * np.stack([w, h, w, h], axis=-1)
    return bboxes


def adjust_landmarks(landmarks, bboxes):
    """mtcnn.utils.landmarks.adjust_landmarks (the result stays float32, as there)."""
    landmarks = np.array(landmarks, dtype=np.float32, copy=True)
    w = bboxes[:, 3:4] - bboxes[:, 1:2] + 1
    h = bboxes[:, 4:5] - bboxes[:, 2:3] + 1
    landmarks[:, 0:5] = w * landmarks[:, 0:5] + bboxes[:, 1:2] - 1
    landmarks[:, 5:10] = h * landmarks[:, 5:10] + bboxes[:, 2:3] - 1
    return landmarks


def _limit_bboxes(bboxes, height, width):
    """mtcnn.utils.bboxes.limit_bboxes(limit_landmarks=False) for one image."""
    bboxes = bboxes.copy()
    bboxes[:, [1, 3]] = np.minimum(np.maximum(bboxes[:, [1, 3]], 0), width - 1)
    bboxes[:, [2, 4]] = np.minimum(np.maximum(bboxes[:, [2, 4]], 0), height - 1)
    return bboxes


def _to_json(row):
    """mtcnn.utils.bboxes.to_json for one row (rounded as parse_bbox / parse_landmarks do),
    then as plain floats like workers.detection.Detector.detect."""
    x1, y1, x2, y2 = row[1:5]
    box = np.asarray([x1, y1, x2 - x1, y2 - y1]).round()
    marks = row[6:16].round()
    return {
        "box": [float(v) for v in box],
        "confidence": float(row[5]),
        "keypoints": {name: [float(marks[i]), float(marks[i + 5])] for i, name in enumerate(KEYPOINTS)},
    }


def default_model_dir():
    """ONNX_MODEL_DIR from the environment, else models/mtcnn-onnx under the repository root."""
    return Path(os.environ.get("ONNX_MODEL_DIR") or Path(__file__).resolve().parent.parent / "models" / "mtcnn-onnx")

"""Pose and quality of a detected face, from its keypoints and its pixels, with no model of its own.

`describe(image, face)` gives SPEC 2.1's `pose` (yaw, pitch, roll, degrees) and `quality`
(sharpness, brightness, contrast on 0..1, `ipd` in the original's pixels) of one face of
`detection.find_faces`, whichever engine found it: MTCNN's keypoints (eyes, nose, mouth corners)
and BlazeFace's (eyes, nose, mouth centre, ears) are fitted to one generic 3D face, `MODEL`.

- roll: the eye line's angle in the image, counter-clockwise positive (the image-right eye higher),
  so turning the photo counter-clockwise by t degrees adds t; mirroring the photo negates it.
- yaw, pitch: a weighted scaled-orthographic fit (rotation, scale, shift; Gauss-Newton) of the
  keypoints to MODEL, its rotation taken apart as in-plane turn, then yaw, then pitch: yaw > 0
  turned towards the image's right, pitch > 0 looking up; -90..90, relative to the line of sight.
- sharpness: var(Laplacian) / var(luma) on the face box resized to CROP x CROP grey levels (so a
  face's size and its lighting cancel out), mapped to 0..1 by 1 - exp(-r / SHARPNESS_SCALE).
- brightness: mean luma, 0..1. contrast: RMS contrast, the standard deviation of that luma (0..0.5).
- ipd: the distance between the eye keypoints.

docs/quality.md has the details, how each value was checked, and where not to trust it (tiny
faces, poses past about 45 degrees, MTCNN's keypoint jitter of a few degrees).
"""

import functools
import math

import numpy as np
import PIL.Image

# A generic adult face in millimetres: x towards the image's right for a frontal face, y up, z
# towards the camera, origin between the eye centres. Interpupillary distance 63 mm; the frontal
# layout of nose and mouth is the rounded mean of MTCNN's keypoints over the faces of tests/photos
# (in eye distances), so that a face looking into the camera fits near yaw and pitch 0; depths and
# ears are anthropometric estimates (docs/quality.md). Names follow the engines' image-left/right
# convention.
MODEL = {
    "left_eye": (-31.5, 0.0, 0.0),
    "right_eye": (31.5, 0.0, 0.0),
    "nose": (0.0, -40.0, 24.0),
    "mouth_left": (-28.0, -66.0, 0.0),
    "mouth_right": (28.0, -66.0, 0.0),
    "mouth": (0.0, -66.0, 8.0),
    "left_ear": (-72.0, -15.0, -80.0),
    "right_ear": (72.0, -15.0, -80.0),
}
# BlazeFace guesses a hidden ear as readily as it sees a visible one: they count half.
WEIGHTS = {"left_ear": 0.5, "right_ear": 0.5}
# Side of the square grey crop that sharpness, brightness and contrast are measured on: a face's
# own scale, so a 200-px face and its 100-px copy read alike.
CROP = 64
# Sharpness = 1 - exp(-r / SHARPNESS_SCALE): r is 0.1-0.55 on the faces of tests/photos, which then
# read 0.33-0.89; a Gaussian blur of 1.5 px takes 0.1-0.55 off them (bench/face_quality.py).
SHARPNESS_SCALE = 0.25
ITERATIONS = 30
TOLERANCE = 1e-3  # radians: 0.06 degrees, under the output's rounding


def describe(image, face):
    """`{"pose": {...}, "quality": {...}}` of one face of an upright RGB Pillow image."""
    keypoints = face["keypoints"]
    return {
        "pose": {**_yaw_pitch(keypoints), "roll": round(roll(keypoints), 1) + 0.0},
        "quality": {**_pixels(image, face["box"]), "ipd": round(ipd(keypoints), 1)},
    }


def describe_all(image, faces):
    """Add `pose` and `quality` to each face of `find_faces`, in place; returns the faces."""
    for face in faces:
        face.update(describe(image, face))
    return faces


def roll(keypoints):
    """The eye line's angle in degrees, -180..180, counter-clockwise (image-right eye higher) positive."""
    (lx, ly), (rx, ry) = keypoints["left_eye"], keypoints["right_eye"]
    return math.degrees(math.atan2(ly - ry, rx - lx))


def ipd(keypoints):
    """The distance between the eye centres, in the keypoints' pixels."""
    (lx, ly), (rx, ry) = keypoints["left_eye"], keypoints["right_eye"]
    return math.hypot(rx - lx, ry - ly)


def fit(keypoints):
    """Fit MODEL to the keypoints under scaled orthographic projection.

    Returns (rotation 3x3, scale, shift 2) with image point (x, -y) ~ scale * (rotation @ P)[:2] +
    shift for each model point P: y is flipped so that the fit's axes are x right, y up, z out.
    Weighted least squares; the shift and scale are solved exactly for each rotation (variable
    projection) and the rotation by Gauss-Newton steps. Plain floats: on five or six points numpy's
    per-call overhead costs more than the arithmetic.
    """
    names = tuple(sorted(name for name in keypoints if name in MODEL))
    model, weights, model_centre = _centred_model(names)
    points = [(keypoints[name][0], -keypoints[name][1]) for name in names]
    cx = sum(w * x for w, (x, _y) in zip(weights, points, strict=True))
    cy = sum(w * y for w, (_x, y) in zip(weights, points, strict=True))
    seen = [(x - cx, y - cy) for x, y in points]

    rotation = _exp(0.0, 0.0, math.radians(roll(keypoints)))  # start frontal, at the eye line's roll
    scale = 0.0
    for _ in range(ITERATIONS):
        rotated = [_apply(rotation, point) for point in model]
        projected = sum(w * (qx * qx + qy * qy) for w, (qx, qy, _qz) in zip(weights, rotated, strict=True))
        scale = sum(w * (qx * u + qy * v) for w, (qx, qy, _qz), (u, v) in zip(weights, rotated, seen, strict=True))
        scale /= projected
        # Gauss-Newton normal equations for R <- exp([omega]x) R, whose d(R P)/d(omega) is
        # -[R P]x; with scale^2 and scale factored out of them.
        zz = zx = zy = xy = g1 = g2 = g3 = 0.0
        for w, (qx, qy, qz), (u, v) in zip(weights, rotated, seen, strict=True):
            rx, ry = scale * qx - u, scale * qy - v
            zz += w * qz * qz
            zx += w * qz * qx
            zy += w * qz * qy
            xy += w * (qx * qx + qy * qy)
            g1 -= w * qz * ry
            g2 += w * qz * rx
            g3 += w * (qx * ry - qy * rx)
        # [[zz, 0, -zx], [0, zz, -zy], [-zx, -zy, xy]] omega = -(g1, g2, g3) / scale
        pivot = zz * (xy * zz - zx * zx - zy * zy)
        if abs(scale) < 1e-9 or abs(pivot) < 1e-12 * (xy * zz) ** 1.5:
            break  # keypoints on top of each other: no rotation to find
        t1, t2, t3 = -g1 / scale, -g2 / scale, -g3 / scale
        oz = zz * (t3 * zz + zx * t1 + zy * t2) / pivot
        ox, oy = (t1 + zx * oz) / zz, (t2 + zy * oz) / zz
        rotation = _matmul(_exp(ox, oy, oz), rotation)
        if max(abs(ox), abs(oy), abs(oz)) < TOLERANCE:
            break
    rotation = np.array(rotation)
    if scale < 0:  # -s R[:2] is s (Rz(180) R)[:2]: the same fit with a positive scale
        rotation, scale = np.diag([-1.0, -1.0, 1.0]) @ rotation, -scale
    shift = np.array([cx, cy]) - scale * (rotation @ model_centre)[:2]
    return rotation, scale, shift


@functools.cache
def _centred_model(names):
    """MODEL's points for these names about their weighted centre, the weights (summing to 1), the centre."""
    weights = [WEIGHTS.get(name, 1.0) for name in names]
    weights = [w / sum(weights) for w in weights]
    centre = [sum(w * MODEL[name][axis] for w, name in zip(weights, names, strict=True)) for axis in range(3)]
    model = [tuple(MODEL[name][axis] - centre[axis] for axis in range(3)) for name in names]
    return model, weights, np.array(centre)


def _yaw_pitch(keypoints):
    """Yaw and pitch of the fitted rotation taken apart as Rz(in-plane) Ry(yaw) Rx(-pitch): the
    in-plane turn is split off first, so turning the photo leaves yaw and pitch alone."""
    rotation, _scale, _shift = fit(keypoints)
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -rotation[2, 0]))))
    # A fit that tipped the face past the vertical is clamped there.
    pitch = max(-90.0, min(90.0, -math.degrees(math.atan2(rotation[2, 1], rotation[2, 2]))))
    if not (math.isfinite(yaw) and math.isfinite(pitch)):
        return {"yaw": 0.0, "pitch": 0.0}
    return {"yaw": round(yaw, 1) + 0.0, "pitch": round(pitch, 1) + 0.0}  # + 0.0: no "-0.0"


def _pixels(image, box):
    """Sharpness, brightness and contrast of the face box, on CROP x CROP luma."""
    x, y = box["x"], box["y"]
    width, height = max(box["width"], 1), max(box["height"], 1)
    # One antialiased resize, whatever the face's size: a box-average first (Image.reduce) is
    # faster but makes a 200-px face read 0.05 sharper than its 100-px copy.
    grey = image.crop((x, y, x + width, y + height)).convert("L").resize((CROP, CROP), PIL.Image.Resampling.BILINEAR)
    luma = np.asarray(grey, dtype=np.float32)
    variance = float(luma.var())
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * luma[1:-1, 1:-1]
    ratio = float(laplacian.var()) / variance if variance > 1e-6 else 0.0
    return {
        "sharpness": round(1.0 - math.exp(-ratio / SHARPNESS_SCALE), 3),
        "brightness": round(float(luma.mean()) / 255.0, 3),
        "contrast": round(math.sqrt(variance) / 255.0, 3),
    }


def _exp(x, y, z):
    """Rodrigues: the rotation matrix (rows of floats) of the rotation vector (x, y, z), radians."""
    theta = math.sqrt(x * x + y * y + z * z)
    if theta < 1e-12:
        return ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    kx, ky, kz = x / theta, y / theta, z / theta
    c, s = math.cos(theta), math.sin(theta)
    v = 1.0 - c
    return (
        (c + kx * kx * v, kx * ky * v - kz * s, kx * kz * v + ky * s),
        (ky * kx * v + kz * s, c + ky * ky * v, ky * kz * v - kx * s),
        (kz * kx * v - ky * s, kz * ky * v + kx * s, c + kz * kz * v),
    )


def _apply(rows, point):
    return tuple(r[0] * point[0] + r[1] * point[1] + r[2] * point[2] for r in rows)


def _matmul(a, b):
    return tuple(tuple(sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)) for i in range(3))

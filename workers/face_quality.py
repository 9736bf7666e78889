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
# layout of nose and mouth is MTCNN's mean on the portraits of tests/photos, so that a face looking
# into the camera fits at yaw and pitch near 0; depths and ears are anthropometric estimates
# (docs/quality.md). Names follow the engines' image-left/right convention.
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
# Sharpness = 1 - exp(-r / SHARPNESS_SCALE): r is 0.1-0.55 on the sharp faces of tests/photos,
# which then read 0.3-0.9; a 2-px Gaussian blur of a portrait roughly halves r.
SHARPNESS_SCALE = 0.25
ITERATIONS = 20
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
    """Fit MODEL to the keypoints under scaled orthographic projection (weighted Gauss-Newton).

    Returns (rotation 3x3, scale, shift 2) with image point (x, -y) ~ scale * (rotation @ P)[:2] +
    shift for each model point P: y is flipped so that the fit's axes are x right, y up, z out.
    """
    names = tuple(sorted(name for name in keypoints if name in MODEL))
    model, weights = _model(names)
    points = np.array([keypoints[name] for name in names], dtype=float) * (1.0, -1.0)

    # Start frontal, with the eye line's roll and the eyes' scale and place.
    rotation = _rotation(0.0, 0.0, math.radians(roll(keypoints)))
    scale = max(ipd(keypoints), 1e-6) / (MODEL["right_eye"][0] - MODEL["left_eye"][0])
    shift = points.mean(axis=0) - scale * (model @ rotation.T)[:, :2].mean(axis=0)
    jacobian = np.zeros((len(names), 2, 6))
    jacobian[:, 0, 4] = jacobian[:, 1, 5] = 1.0
    for _ in range(ITERATIONS):
        rotated = model @ rotation.T
        residual = ((scale * rotated[:, :2] + shift - points) * weights).ravel()
        # d(R P)/d(omega) = -[R P]x for R <- exp([omega]x) R: only x and y of it are seen.
        x, y, z = rotated[:, 0] * scale, rotated[:, 1] * scale, rotated[:, 2] * scale
        jacobian[:, 0, 1], jacobian[:, 0, 2] = z, -y
        jacobian[:, 1, 0], jacobian[:, 1, 2] = -z, x
        jacobian[:, :, 3] = rotated[:, :2]
        weighted = (jacobian * weights[:, :, None]).reshape(-1, 6)
        normal = weighted.T @ weighted
        # Levenberg's damping keeps a step sane where the points barely constrain depth.
        normal.flat[::7] *= 1.0 + 1e-3
        try:
            step = np.linalg.solve(normal, -weighted.T @ residual)
        except np.linalg.LinAlgError:  # keypoints on top of each other: keep the frontal start
            break
        rotation = _exp(step[:3]) @ rotation
        scale += step[3]
        shift = shift + step[4:]
        if abs(step[:3]).max() < TOLERANCE:
            break
    if scale < 0:  # -s R[:2] is s (Rz(180) R)[:2]: the same fit with a positive scale
        rotation, scale = np.diag([-1.0, -1.0, 1.0]) @ rotation, -scale
    return rotation, scale, shift


@functools.cache
def _model(names):
    """MODEL's points for these keypoint names, and the square roots of their weights (N x 1)."""
    model = np.array([MODEL[name] for name in names])
    return model, np.sqrt([[WEIGHTS.get(name, 1.0)] for name in names])


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
    right, bottom = x + max(box["width"], 1), y + max(box["height"], 1)
    grey = image.crop((x, y, right, bottom)).convert("L").resize((CROP, CROP), PIL.Image.Resampling.BILINEAR)
    luma = np.asarray(grey, dtype=np.float32) / 255.0
    variance = float(luma.var())
    laplacian = (luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:]) - 4.0 * luma[1:-1, 1:-1]
    ratio = float(laplacian.var()) / variance if variance > 1e-8 else 0.0
    return {
        "sharpness": round(1.0 - math.exp(-ratio / SHARPNESS_SCALE), 3),
        "brightness": round(float(luma.mean()), 3),
        "contrast": round(math.sqrt(variance), 3),
    }


def _exp(omega):
    """Rodrigues: the rotation matrix of a rotation vector."""
    x, y, z = (float(v) for v in omega)
    theta = math.sqrt(x * x + y * y + z * z)
    if theta < 1e-12:
        return np.eye(3)
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]]) / theta
    return np.eye(3) + math.sin(theta) * cross + (1.0 - math.cos(theta)) * (cross @ cross)


def _rotation(x, y, z):
    """The rotation matrix of a rotation vector, in radians."""
    return _exp((x, y, z))

"""Detection quality: recall and false faces against boxes a person drew, for any engine and
setting, side by side on the same photos.

Run from the repository root:
    .venv/bin/python -m bench.quality                      # every engine at its defaults, every set
    .venv/bin/python -m bench.quality --engines mtcnn,mtcnn:max_side=1920,package --sets vlad
    .venv/bin/python -m bench.quality --engines blazeface --confidences 0.5,0.6,0.7,0.8,0.9
    .venv/bin/python -m bench.quality --write-baseline     # what tests/test_quality.py holds engines to

Sets (see tests/annotated/README.md): `dlib` (4 photos, 18 faces boxed by dlib's annotators),
`photos` (tests/photos: 13 photos, 15 faces, 4 photos without one), `vlad` (3 group photos,
13 faces). A photo of a set without a box has no face: whatever is found on it is a false face.

Engines, each written `name[:key=value,...]`:
  package     the `mtcnn` package as shipped, at full resolution (TensorFlow; `threshold`, default 0.9)
  mtcnn       the platform's MTCNN engine through its resolution policy (workers.detection);
              keys: the keyword arguments of its find_faces, e.g. `max_side=1920`
  blazeface   the platform's BlazeFace engine (workers.blazeface); keys: those of its find_faces
A detection is a found face when it overlaps a box at IoU >= 0.5, matched one-to-one, highest
IoU first; every other detection is a false face. With --confidences each engine runs once at the
lowest value and its detections are filtered at each, so a sweep costs one run.

Every photo is written with the boxes drawn (green: truth found, yellow: truth missed, blue:
detection that matched, red: false face) to --out, one folder per engine and confidence, so a
person can look.
"""

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETS = {
    "dlib": REPO / "tests" / "annotated" / "dlib",
    "photos": REPO / "tests" / "photos",
    "vlad": REPO / "tests" / "annotated" / "vlad",
}
BASELINE = REPO / "tests" / "annotated" / "baseline.json"
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IOU_THRESHOLD = 0.5


@dataclass
class Photo:
    set: str
    name: str
    path: Path
    truth: list = field(default_factory=list)  # [(x, y, w, h), ...]

    @property
    def key(self):
        return f"{self.set}/{self.name}"


def load_sets(names=tuple(SETS)):
    """The photos of the named sets, each with its boxes (none for a photo without a face)."""
    photos = []
    for name in names:
        folder = SETS[name]
        boxes = {}
        with open(folder / "boxes.tsv", newline="") as table:
            for row in csv.DictReader(table, delimiter="\t"):
                boxes.setdefault(row["file"], []).append(tuple(int(row[k]) for k in ("x", "y", "width", "height")))
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in SUFFIXES)
        unknown = set(boxes) - {path.name for path in files}
        if unknown:
            raise SystemExit(f"{folder}/boxes.tsv names photos that are not there: {sorted(unknown)}")
        photos += [Photo(name, path.name, path, boxes.get(path.name, [])) for path in files]
    return photos


def iou(a, b):
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match(truth, boxes, threshold=IOU_THRESHOLD):
    """One-to-one matching, highest IoU first. Returns ({truth index: box index}, IoUs)."""
    pairs = sorted(
        ((iou(t, b), ti, bi) for ti, t in enumerate(truth) for bi, b in enumerate(boxes)), reverse=True
    )
    matched, used, ious = {}, set(), []
    for overlap, ti, bi in pairs:
        if overlap < threshold:
            break
        if ti in matched or bi in used:
            continue
        matched[ti] = bi
        used.add(bi)
        ious.append(overlap)
    return matched, ious


@dataclass
class Score:
    """What an engine found on one photo at one confidence."""

    faces: int
    found: int
    false: int
    ious: list

    def __add__(self, other):
        return Score(self.faces + other.faces, self.found + other.found, self.false + other.false, self.ious + other.ious)


def score(truth, detections):
    matched, ious = match(truth, [box for box, _ in detections])
    return Score(len(truth), len(matched), len(detections) - len(matched), ious), matched


def totals(scores):
    total = Score(0, 0, 0, [])
    for item in scores:
        total += item
    return total


def f1(total):
    precision = total.found / (total.found + total.false) if total.found + total.false else 1.0
    recall = total.found / total.faces if total.faces else 1.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# ------------------------------------------------------------------------------------ engines


def parse_spec(spec):
    """'mtcnn:max_side=1920,min_face_size=12' -> ('mtcnn', {'max_side': 1920, 'min_face_size': 12})."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = json.loads(value) if value[:1] in "-0123456789.tf[" else value
    return name, options


def make_engine(spec, min_confidence):
    """A function from an upright RGB Pillow image to [((x, y, w, h), confidence), ...], every
    detection at or above `min_confidence` (lower than the engine's default when sweeping)."""
    import numpy as np

    name, options = parse_spec(spec)
    if name == "package":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from mtcnn import MTCNN

        package = MTCNN()
        threshold = options.get("threshold", 0.9)

        def detect(image):
            faces = package.detect_faces(np.asarray(image), min_face_size=options.get("min_face_size", 20))
            return [(tuple(face["box"]), float(face["confidence"])) for face in faces if face["confidence"] >= threshold]

    elif name in ("mtcnn", "blazeface"):
        from workers.detection import find_faces

        def detect(image):
            faces = find_faces(image, engine=name, **{"min_confidence": min_confidence, **options})
            return [(tuple(face["box"][k] for k in ("x", "y", "width", "height")), face["confidence"]) for face in faces]

    else:
        raise SystemExit(f"unknown engine {name!r}: package, mtcnn or blazeface")
    return detect


def default_confidence(spec):
    name, options = parse_spec(spec)
    if "min_confidence" in options:
        return options["min_confidence"]
    if name == "package":
        return options.get("threshold", 0.9)
    from workers import detection

    return detection.DEFAULT_MIN_CONFIDENCE[name]


def load_image(path):
    from workers.detection import load_upright_rgb

    return load_upright_rgb(path.read_bytes())


def run(photos, spec, confidences=None):
    """Detect once per photo; returns {confidence: {photo key: (Score, matched, detections)}}, and
    the seconds spent detecting."""
    confidences = confidences or [default_confidence(spec)]
    detect = make_engine(spec, min(confidences))
    found, seconds = {}, 0.0
    for photo in photos:
        image = load_image(photo.path)
        detect(image)  # warm-up: the first call of a size allocates and plans
        start = time.perf_counter()
        found[photo.key] = detect(image)
        seconds += time.perf_counter() - start
    results = {}
    for confidence in confidences:
        results[confidence] = {}
        for photo in photos:
            detections = [d for d in found[photo.key] if d[1] >= confidence]
            results[confidence][photo.key] = (*score(photo.truth, detections), detections)
    return results, seconds


def draw(photo, detections, matched, path):
    """The photo with truth and detections drawn, at most 1280 px on the long side."""
    import PIL.ImageDraw

    image = load_image(photo.path)
    scale = min(1.0, 1280 / max(image.size))
    if scale < 1.0:
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)))
    pen = PIL.ImageDraw.Draw(image)
    width = max(2, round(3 * max(image.size) / 1000))

    def rect(box, color, grow=0):
        x, y, w, h = (v * scale for v in box)
        pen.rectangle([x - grow, y - grow, x + w + grow, y + h + grow], outline=color, width=width)

    for index, box in enumerate(photo.truth):
        rect(box, (0, 200, 0) if index in matched else (255, 220, 0), grow=width)
    hits = set(matched.values())
    for index, (box, confidence) in enumerate(detections):
        rect(box, (40, 120, 255) if index in hits else (255, 0, 0))
        pen.text((box[0] * scale + 3, box[1] * scale + 2), f"{confidence:.2f}", fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=85)


# ------------------------------------------------------------------------------------- report


def report(photos, runs, out):
    """Per photo and in total, one column per engine and confidence; draws every photo."""
    columns = [(spec, confidence) for spec, (results, _) in runs.items() for confidence in results]
    label = {(spec, c): spec if len(runs[spec][0]) == 1 else f"{spec}@{c}" for spec, c in columns}
    width = max(14, *(len(text) for text in label.values()))
    print(f"\n{'photo':34} {'faces':>5}  " + "  ".join(f"{label[col]:>{width}}" for col in columns))
    print(f"{'':34} {'':>5}  " + "  ".join(f"{'found / false':>{width}}" for _ in columns))
    for photo in photos:
        cells = []
        for spec, confidence in columns:
            item, matched, detections = runs[spec][0][confidence][photo.key]
            cells.append(f"{f'{item.found} / {item.false}':>{width}}")
            if out:
                folder = label[(spec, confidence)].replace("/", "_").replace(":", "_")
                draw(photo, detections, matched, Path(out) / folder / f"{photo.set}_{Path(photo.name).stem}.jpg")
        print(f"{photo.key:34} {len(photo.truth):>5}  " + "  ".join(cells))
    print()
    sets = sorted({photo.set for photo in photos}, key=list(SETS).index)
    for name in [*sets, "all"]:
        keys = [p.key for p in photos if name in ("all", p.set)]
        print(f"{name:34} {'':>5}  " + "  ".join(
            f"{describe(totals(runs[spec][0][c][k][0] for k in keys)):>{width}}" for spec, c in columns
        ))
    print(f"\n{'':34} {'':>5}  " + "  ".join(f"{'recall  false  F1':>{width}}" for _ in columns))
    for spec, (_, seconds) in runs.items():
        print(f"{spec}: {seconds / len(photos) * 1000:.0f} ms a photo (mean, warm, one process)")
    if out:
        print(f"drawn: {out}/<engine>/<set>_<photo>.jpg (green: found, yellow: missed, blue: match, red: false)")


def describe(total):
    recall = total.found / total.faces if total.faces else 1.0
    return f"{total.found}/{total.faces} {recall:.2f}  {total.false}  {f1(total):.2f}"


def baseline_of(runs):
    """{engine: {photo key: [found, false]}} at each engine's own default confidence."""
    return {
        spec: {key: [item.found, item.false] for key, (item, _, _) in next(iter(results.values())).items()}
        for spec, (results, _) in runs.items()
    }


def format_baseline(baseline):
    """JSON with one photo a line, so a change of the baseline reads as a diff of photos."""
    engines = []
    for spec in sorted(baseline):
        rows = ",\n".join(f"    {json.dumps(key)}: {json.dumps(value)}" for key, value in sorted(baseline[spec].items()))
        engines.append(f"  {json.dumps(spec)}: {{\n{rows}\n  }}")
    return "{\n" + ",\n".join(engines) + "\n}\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="package,mtcnn,blazeface")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--confidences", help="comma-separated: sweep every engine over these")
    parser.add_argument("--out", default=str(REPO / "bench-output" / "quality"), help="'' draws nothing")
    parser.add_argument("--write-baseline", action="store_true", help=f"write {BASELINE.relative_to(REPO)}")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "face_detect_api.settings")
    import django

    django.setup()

    photos = load_sets(args.sets.split(","))
    confidences = [float(c) for c in args.confidences.split(",")] if args.confidences else None
    specs = args.engines.split(",")
    print(f"{len(photos)} photos, {sum(len(p.truth) for p in photos)} faces boxed; engines: {', '.join(specs)}")
    runs = {spec: run(photos, spec, confidences) for spec in specs}
    report(photos, runs, args.out)
    if args.write_baseline:
        if confidences or args.sets != ",".join(SETS):
            sys.exit("--write-baseline takes every set at each engine's default confidence")
        BASELINE.write_text(format_baseline(baseline_of(runs)))
        print(f"wrote {BASELINE.relative_to(REPO)}")


if __name__ == "__main__":
    main()

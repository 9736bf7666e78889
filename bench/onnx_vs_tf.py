"""The platform's TensorFlow detector against the ONNX Runtime engine, on the photos of tests/photos/.

Run from the repository root:
    .venv/bin/python -m bench.onnx_vs_tf [--passes 3] [--models DIR] [--max-side 1024] [--unfused]

Engines, all through `workers.detection.find_faces(image, min_face_size=20, max_side=1024,
detector=...)`, i.e. at the platform's resolution policy (long side <= 1024 px):
  tf-1t      workers.detection.Detector(threads=1): mtcnn with tf.function-wrapped networks
  onnx-1t    workers.onnx_engine.OnnxDetector(DIR, threads=1)
  onnx-2t    workers.onnx_engine.OnnxDetector(DIR, threads=2)
  onnx-1t-unfused   (with --unfused) models exported with --prelu keep (tf2onnx's PReLU), 1 thread

All engines live in this one process (TensorFlow's pools idle while ONNX Runtime runs and the
other way round). Photos are decoded once; the timed call starts from the decoded Pillow image.
Every engine first runs over all photos once (warm-up), then each of N passes visits the photos in
a fresh random order and, photo by photo, every engine runs it in turn (the turn order rotates),
so slow drift and other programs' load land on all engines alike. Reported per engine: the median
over passes of the per-photo time for the 1920-px photos, the ~500-px photos (long side 300-800)
and all photos, the median seconds per pass, CPU seconds per wall second while it ran ("busy
cores"), and faces found (confidence >= 0.9). "other load" is the machine's CPU time outside this
process per wall second during the whole measurement (/proc/stat): well above 0 means something
else ran too and the absolute figures are inflated; the ratios suffer less.

Without --models the models are exported (from the mtcnn package's weights) into a temporary
directory first; the default model directory (ONNX_MODEL_DIR or models/mtcnn-onnx) is used if
it holds them.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "face_detect_api.settings")

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "photos"
LARGE_SIDE = 1500
SMALL_SIDES = (300, 800)


def system_busy_seconds():
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def load_photos():
    import PIL.Image
    import PIL.ImageOps

    photos = {}
    for path in sorted(PHOTOS.iterdir()):
        if path.suffix.lower() in {".jpg", ".jpeg", ".png"}:
            with PIL.Image.open(path) as image:
                photos[path.name] = PIL.ImageOps.exif_transpose(image).convert("RGB")
    return photos


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", help="directory with pnet.onnx, rnet.onnx, onet.onnx")
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--unfused", action="store_true", help="also time models without the PReLU fusion")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    # TensorFlow's thread settings must precede anything that starts TensorFlow (the export).
    from workers.detection import Detector, find_faces
    from workers.onnx_engine import MODEL_FILES, OnnxDetector, default_model_dir

    engines = {"tf-1t": Detector(threads=1)}
    scratch = tempfile.TemporaryDirectory(prefix="mtcnn-onnx-")
    model_dir = Path(args.models) if args.models else default_model_dir()
    if not all((model_dir / name).is_file() for name in MODEL_FILES.values()):
        from workers.onnx_export import export

        model_dir = Path(scratch.name) / "fused"
        export(model_dir, log=lambda line: print("export:", line))
    engines["onnx-1t"] = OnnxDetector(model_dir, threads=1)
    engines["onnx-2t"] = OnnxDetector(model_dir, threads=2)
    if args.unfused:
        from workers.onnx_export import export

        unfused = Path(scratch.name) / "unfused"
        export(unfused, prelu="keep", log=lambda line: print("export:", line))
        engines["onnx-1t-unfused"] = OnnxDetector(unfused, threads=1)

    photos = load_photos()
    names = list(photos)
    large = {n for n in names if max(photos[n].size) >= LARGE_SIDE}
    small = {n for n in names if SMALL_SIDES[0] <= max(photos[n].size) <= SMALL_SIDES[1]}

    def run(engine, name):
        start, cpu = time.perf_counter(), time.process_time()
        faces = find_faces(
            photos[name], min_face_size=20, min_confidence=0.9, max_side=args.max_side, detector=engines[engine]
        )
        return time.perf_counter() - start, time.process_time() - cpu, faces

    for engine in engines:  # warm-up: first calls allocate, trace, tune
        for name in names:
            run(engine, name)

    print(f"{len(names)} photos ({len(large)} of >= {LARGE_SIDE} px, {len(small)} of 300-800 px), "
          f"max side {args.max_side}, {args.passes} passes; load average before: "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    rng = random.Random(args.seed)
    order = list(engines)
    times = {e: [{} for _ in range(args.passes)] for e in engines}
    cpu = {e: 0.0 for e in engines}
    wall = {e: 0.0 for e in engines}
    faces = {e: {} for e in engines}
    busy_start, own_start, start = system_busy_seconds(), time.process_time(), time.perf_counter()
    for number in range(args.passes):
        rng.shuffle(names)
        turn = order[number % len(order):] + order[: number % len(order)]
        for name in names:
            for engine in turn:
                seconds, cpu_seconds, found = run(engine, name)
                times[engine][number][name] = seconds
                cpu[engine] += cpu_seconds
                wall[engine] += seconds
                faces[engine][name] = found
    elapsed = time.perf_counter() - start
    other = (system_busy_seconds() - busy_start - (time.process_time() - own_start)) / elapsed
    print("load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg())
          + f"; other load during the run: {other:.2f} cores")

    def per_photo_ms(engine, subset):
        return statistics.median(
            statistics.median(times[engine][p][n] for n in subset) for p in range(args.passes)
        ) * 1000

    header = (
        f"{'engine':<16} {'1920px ms':>10} {'~500px ms':>10} {'all ms':>8} {'s/pass':>7} {'busy':>5} {'faces':>6} "
        f"{'vs tf-1t':>9}"
    )
    print(header)
    print("-" * len(header))
    base = statistics.median(sum(t.values()) for t in times["tf-1t"])
    for engine in engines:
        per_pass = statistics.median(sum(t.values()) for t in times[engine])
        found = sum(len(v) for v in faces[engine].values())
        print(f"{engine:<16} {per_photo_ms(engine, large):>10.1f} {per_photo_ms(engine, small):>10.1f} "
              f"{per_photo_ms(engine, names):>8.1f} {per_pass:>7.2f} {cpu[engine] / wall[engine]:>5.2f} "
              f"{found:>6} {base / per_pass:>8.2f}x")
    reference = faces["tf-1t"]
    for engine in engines:
        if engine != "tf-1t":
            differing = [n for n in names if len(faces[engine][n]) != len(reference[n])]
            if differing:
                print(f"{engine}: face counts differ from tf-1t on {', '.join(sorted(differing))}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The BlazeFace engine (workers.blazeface): its runtimes, its cost per photo size, decoding, memory.

Run from the repository root (after `make install`, which converts the model):
    .venv/bin/python -m bench.blazeface [--rounds 7] [--only network,latency,throughput,decode,memory]

Sections
  network     one 192 x 192 inference, CPU ms (one thread), of the four ways to run the model:
              the sparse and the dense full-range model, each on ONNX Runtime (converted by
              workers.blazeface_export into a temporary directory) and on TensorFlow's TFLite
              interpreter; interleaved round by round, medians.
  latency     `BlazeFace.find_faces` with its defaults on the group photos of tests/photos resized
              to about 512, 1024 and 1920 px on the long side (already decoded), beside the same
              without tiles (max_side=192) and the MTCNN ONNX engine as the platform runs it
              (workers.detection.find_faces, max_side=1024); wall and CPU ms per photo, medians.
  throughput  photos per second of one single-threaded process (= per core) over all photos of
              tests/photos, decoded beforehand, for the same three.
  decode      Pillow decoding (EXIF orientation, RGB) of the 1920-px JPEGs in full and with
              `draft` at 1/2, 1/4 and 1/8 scale, beside find_faces on the full-size photo.
  memory      peak RSS (VmHWM) of a fresh process that imports only workers.blazeface, loads the
              model and detects on every photo, and of one that does the same with the MTCNN ONNX
              engine; each also says whether tensorflow ended up in sys.modules.

Figures on a shared 2-core machine are noisy: read the ratios within one run.
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "photos"
GROUPS = ("vlad_sample1.jpg", "vlad_sample2.jpg", "vlad_sample3.jpg")
SIZES = (512, 1024, 1920)


def photo_names():
    return sorted(p.name for p in PHOTOS.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def load(name):
    from workers.detection import load_upright_rgb

    return load_upright_rgb((PHOTOS / name).read_bytes())


def resized(image, side):
    scale = side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.Resampling.LANCZOS)


def timed(func, *args, **kwargs):
    """(wall ms, CPU ms) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    func(*args, **kwargs)
    return 1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)


def engines():
    """name -> find_faces(image) of the engines compared."""
    from workers import blazeface
    from workers.detection import find_faces
    from workers.onnx_engine import OnnxDetector, default_model_dir

    detector = blazeface.BlazeFace(blazeface.default_model_dir(), threads=1)
    mtcnn = OnnxDetector(default_model_dir(), threads=1)
    return {
        "blazeface (defaults)": detector.find_faces,
        "blazeface, no tiles (max_side=192)": lambda image: detector.find_faces(image, max_side=blazeface.INPUT_SIZE),
        "mtcnn onnx (max_side=1024)": lambda image: find_faces(image, max_side=1024, detector=mtcnn),
    }


def network(rounds):
    from workers import blazeface
    from workers.blazeface_export import export, interpreter, run_tflite, tflite_path

    x = np.random.default_rng(0).uniform(-1, 1, (1, 192, 192, 3)).astype(np.float32)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("sparse", "dense"):
            export(Path(tmp) / model, model=model, log=lambda *_: None)
            runs[f"{model}, onnxruntime"] = blazeface.BlazeFace(Path(tmp) / model).run
            it = interpreter(tflite_path(model))
            runs[f"{model}, tflite interpreter"] = lambda t, it=it: run_tflite(it, t)
    times = {name: [] for name in runs}
    for run in runs.values():
        for _ in range(5):
            run(x)
    for _ in range(rounds):
        for name, run in runs.items():
            cpu = time.process_time()
            for _ in range(20):
                run(x)
            times[name].append(1000 * (time.process_time() - cpu) / 20)
    print("\n## network: one 192 x 192 inference, 1 thread")
    for name, values in times.items():
        print(f"  {name:32s} median {statistics.median(values):5.2f} CPU ms  (min {min(values):.2f})")


def latency(rounds):
    from workers import blazeface

    found = engines()
    images = {side: [resized(load(name), side) for name in GROUPS] for side in SIZES}
    times = {(name, side): [] for name in found for side in SIZES}
    for run in found.values():
        for side in SIZES:
            run(images[side][0])
    for _ in range(rounds):
        for side in SIZES:
            for name, run in found.items():
                for image in images[side]:
                    times[(name, side)].append(timed(run, image))
    print("\n## latency per photo (group photos, decoded), wall / CPU ms, medians")
    for name in found:
        cells = []
        for side in SIZES:
            wall = statistics.median(t[0] for t in times[(name, side)])
            cpu = statistics.median(t[1] for t in times[(name, side)])
            cells.append(f"{side} px {wall:6.1f} / {cpu:6.1f}")
        print(f"  {name:36s} " + " | ".join(cells))
    for side in SIZES:
        image = images[side][0]
        _, origins = blazeface.plan(*image.size, 20)
        print(f"  blazeface passes at {image.size[0]} x {image.size[1]}: 2 whole-photo + {len(origins)} tiles")


def throughput(rounds):
    found = engines()
    images = [load(name) for name in photo_names()]
    best = {name: 0.0 for name in found}
    for _ in range(max(2, rounds // 2)):
        for name, run in found.items():
            started = time.perf_counter()
            for image in images:
                run(image)
            best[name] = max(best[name], len(images) / (time.perf_counter() - started))
    print(f"\n## throughput, one single-threaded process, the {len(images)} photos of tests/photos (best pass)")
    for name, rate in best.items():
        print(f"  {name:36s} {rate:6.1f} photos/s per core")


def decode(rounds):
    from workers.blazeface import BlazeFace, default_model_dir

    detector = BlazeFace(default_model_dir())
    data = {name: (PHOTOS / name).read_bytes() for name in GROUPS}

    def decode_at(raw, reduce):
        image = PIL.Image.open(io.BytesIO(raw))
        if reduce > 1:
            image.draft("RGB", (image.width // reduce, image.height // reduce))
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image

    variants = {f"decode 1/{k}": (lambda raw, k=k: decode_at(raw, k)) for k in (1, 2, 4, 8)}
    times = {name: [] for name in variants}
    detect = []
    for _ in range(rounds):
        for raw in data.values():
            for name, func in variants.items():
                times[name].append(timed(func, raw))
            detect.append(timed(detector.find_faces, decode_at(raw, 1)))
    sizes = {name: func(next(iter(data.values()))).size for name, func in variants.items()}
    print("\n## decoding a 1920-px JPEG (vlad_sample1-3), wall / CPU ms, medians")
    for name in variants:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        print(f"  {name:12s} -> {sizes[name][0]} x {sizes[name][1]}: {wall:5.1f} / {cpu:5.1f}")
    wall = statistics.median(t[0] for t in detect)
    cpu = statistics.median(t[1] for t in detect)
    print(f"  blazeface find_faces on the full-size photo: {wall:5.1f} / {cpu:5.1f}")


MEMORY_SCRIPT = """
import json, sys, PIL.Image
engine = sys.argv[1]
if engine == "blazeface":
    from workers.blazeface import BlazeFace, default_model_dir
    detect = BlazeFace(default_model_dir()).find_faces
else:
    from workers.detection import find_faces
    from workers.onnx_engine import OnnxDetector, default_model_dir
    detector = OnnxDetector(default_model_dir())
    detect = lambda image: find_faces(image, max_side=1024, detector=detector)
for path in sys.argv[2:]:
    detect(PIL.Image.open(path).convert("RGB"))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"hwm_mb": int(status["VmHWM"].split()[0]) / 1024, "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
                  "tensorflow": "tensorflow" in sys.modules}))
"""


def memory(rounds):
    paths = [str(PHOTOS / name) for name in photo_names()]
    print("\n## memory of a process that loads one engine and detects on every photo of tests/photos")
    for engine in ("blazeface", "mtcnn-onnx"):
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, engine, *paths], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        if result.returncode:
            print(f"  {engine}: failed: {result.stderr[-500:]}")
            continue
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"  {engine:12s} peak RSS {figures['hwm_mb']:6.1f} MB, at the end {figures['rss_mb']:6.1f} MB, "
            f"tensorflow imported: {figures['tensorflow']}"
        )


SECTIONS = {"network": network, "latency": latency, "throughput": throughput, "decode": decode, "memory": memory}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"bench.blazeface: load average {os.getloadavg()[0]:.2f} at start, {os.cpu_count()} cores")
    for name in args.only.split(","):
        SECTIONS[name](args.rounds)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

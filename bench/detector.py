"""The `mtcnn` package as shipped against the platform's detector, on the photos of tests/photos/.

Run from the repository root:  .venv/bin/python -m bench.detector [--passes 3] [--seed 0]

Engines
  A    `MTCNN().detect_faces(rgb_array)`, the package exactly as shipped, TensorFlow's default
       thread pools (all cores: counted as os.cpu_count() cores).
  B    `workers.detection.find_faces(image, min_face_size=20, min_confidence=0.9, max_side=1024,
       detector=Detector(threads=1))`: tf.function-wrapped networks, photos downscaled to 1024 px
       on the long side, one TensorFlow thread (counted as 1 core).
  C    the same with the platform's default engine, `OnnxDetector(models/mtcnn-onnx, threads=1)`:
       MTCNN's own networks on ONNX Runtime (export them first: `make install`); 1 core.
  C0   C without the resolution policy's second look (`second_look=False`): how the policy ran
       before small candidates were re-judged at full resolution, for the cost of that check.
  Cx2  two C processes fed from one shared queue, one photo at a time, as the platform deploys
       (a single-threaded worker per core, Celery-style prefetch of 1); counted as 2 cores.

How it is measured
  Each engine lives in its own long-running subprocess (`--worker A|B`), so TensorFlow's thread
  settings cannot leak from one to the other; Bx2 uses the B process plus a second B process. The
  parent never imports TensorFlow. Workers decode every photo once at start (Pillow, EXIF
  orientation, RGB) and keep it in memory, so decoding is outside every timing; the timed call
  starts from the decoded Pillow image (A's `np.asarray` and B's downscale are inside it).
  All workers warm up on every photo once (first calls trace graphs and allocate), then the
  parent runs N measured passes. Every pass visits all photos in a fresh random order (same order
  for every engine within a pass), and the engines take turns *within* each pass, with the
  turn order rotated from pass to pass. Only one engine computes at any moment, while the others
  block on their pipe, so each figure is taken on an otherwise idle machine and slow drift or
  noise on this 2-core machine is spread over all engines rather than landing on one of them.
  Interleaving pass by pass is cheap here because the workers stay loaded; "A, then B, then A
  again, keep the best" would need twice A's time for the same protection.

Reported
  img/s best/all   photos of a pass / wall time of the pass, taken by the parent: the engine's
                   fastest pass, and all its passes together. Outside load only ever adds time,
                   so "best" is the steadier figure; the per-core columns use it.
  best/core        best images/s divided by the cores the engine is counted for (see above);
                   "vs A/core" is (engine per core) / (A per core).
  CPU ms/img       process CPU time per photo, measured in the workers, and "busy cores" = CPU
                   time / wall time: how many of the cores an engine is counted for it really
                   keeps busy (the per-core column assumes all of them). "other load" = the
                   machine's CPU time during the engine's turns (/proc/stat) minus the
                   workers', per second: anything well above 0 means another program ran too
                   and the figures of that row are suspect. Bx2 cannot reach 2 busy cores: at
                   the end of each pass one process idles while the other finishes its photo.
  p50/p95 ms       per-photo latency inside the worker, for the 1920-px photos (long side
                   >= 1500) and the ~500-px photos (long side 300-800; the 112-px crop is in
                   neither group); with Bx2 both processes run at once, so its latencies
                   include their contention for memory bandwidth and caches.
  faces            faces at confidence >= 0.9 on photos with faces / faces counted by eye
                   (faces.tsv); "false" = detections on the photos that have no face. A's own
                   output threshold is 0.8, so its faces are filtered at 0.9 here like B's.
  IoU vs A         boxes of the engine matched greedily (highest IoU first) to A's boxes on the
                   same photo (A's boxes clipped to the image), both at confidence >= 0.9: mean
                   and min IoU of the matched pairs, and how many boxes stayed unmatched.
  peak RSS         VmHWM of each worker process (for Bx2 the larger of its two processes; the B
                   process also ran the single-process B turns).
Detections are taken from the warm-up run and checked to be identical in every measured pass.
"""

import argparse
import csv
import json
import os
import random
import selectors
import sys
import time
from pathlib import Path

import numpy as np

from bench.stack import PipeWorker

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "photos"
MIN_CONFIDENCE = 0.9
LARGE_SIDE = 1500
SMALL_SIDES = (300, 800)


# --------------------------------------------------------------------------------------- worker


def load_photo(path):
    import PIL.Image
    import PIL.ImageOps

    with PIL.Image.open(path) as image:
        return PIL.ImageOps.exif_transpose(image).convert("RGB")


def make_engine(engine):
    """A function from a decoded RGB Pillow image to [[x, y, w, h, confidence], ...]."""
    if engine == "A":
        from mtcnn import MTCNN

        mtcnn = MTCNN()

        def detect(image):
            faces = mtcnn.detect_faces(np.asarray(image))
            return [[*map(float, face["box"]), float(face["confidence"])] for face in faces]

        return detect

    from workers.detection import Detector, find_faces

    if engine in ("C", "C0"):
        from workers.onnx_engine import OnnxDetector, default_model_dir

        detector = OnnxDetector(default_model_dir(), threads=1)
    else:
        detector = Detector(threads=1)

    def detect(image):
        faces = find_faces(image, min_face_size=20, min_confidence=MIN_CONFIDENCE, max_side=1024, detector=detector,
                           second_look=engine != "C0")
        return [[*(face["box"][k] for k in ("x", "y", "width", "height")), face["confidence"]] for face in faces]

    return detect


def peak_rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def serve(engine, photo_dir):
    """Answer one JSON request per stdin line: {"files": [...]} or {"stats": true}."""
    # Keras and TensorFlow may print to stdout: keep the protocol on a private copy of fd 1.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    photos = {row["file"]: load_photo(photo_dir / row["file"]) for row in read_table(photo_dir)}
    detect = make_engine(engine)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("stats"):
            reply = {"peak_rss_mb": peak_rss_mb()}
        else:
            cpu_start = time.process_time()
            results = []
            for name in request["files"]:
                start = time.perf_counter()
                faces = detect(photos[name])
                results.append({"file": name, "seconds": time.perf_counter() - start, "faces": faces})
            reply = {"results": results, "cpu_seconds": time.process_time() - cpu_start}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# --------------------------------------------------------------------------------------- parent


def read_table(photo_dir):
    with open(photo_dir / "faces.tsv", newline="") as table:
        rows = list(csv.DictReader(table, delimiter="\t"))
    for row in rows:
        row["width"], row["height"], row["faces"] = int(row["width"]), int(row["height"]), int(row["faces_seen_by_eye"])
    return rows


class Worker(PipeWorker):
    """One engine subprocess, spoken to over its stdin/stdout pipes."""

    def __init__(self, engine, photo_dir):
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        argv = [sys.executable, "-m", "bench.detector", "--worker", engine, "--photos", str(photo_dir)]
        super().__init__(f"worker {engine}", argv, env)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def system_busy_seconds():
    """CPU time spent by the whole machine since boot (all cores, idle and iowait excluded)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_queue(workers, files):
    """Feed photos one at a time to whichever worker is free, as a Celery queue with prefetch 1."""
    pending, results, cpu = list(files), [], 0.0
    selector = selectors.DefaultSelector()
    busy_start, start = system_busy_seconds(), time.perf_counter()
    for worker in workers:
        if pending:
            worker.send({"files": [pending.pop(0)]})
            selector.register(worker.proc.stdout, selectors.EVENT_READ, worker)
    # One request in flight per worker, so a readable pipe holds exactly one whole reply line.
    while selector.get_map():
        for key, _ in selector.select():
            reply = key.data.receive()
            results += reply["results"]
            cpu += reply["cpu_seconds"]
            if pending:
                key.data.send({"files": [pending.pop(0)]})
            else:
                selector.unregister(key.fileobj)
    wall = time.perf_counter() - start
    return {"wall": wall, "results": results, "cpu": cpu, "machine_cpu": system_busy_seconds() - busy_start}


def clip_box(box, width, height):
    x, y, w, h = box
    x0, y0 = min(max(x, 0), width), min(max(y, 0), height)
    x1, y1 = min(max(x + w, 0), width), min(max(y + h, 0), height)
    return x0, y0, x1, y1


def iou(a, b):
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(boxes_a, boxes_b):
    """Greedy IoU matching: (IoUs of matched pairs, unmatched in a, unmatched in b)."""
    pairs = sorted(((iou(a, b), i, j) for i, a in enumerate(boxes_a) for j, b in enumerate(boxes_b)), reverse=True)
    used_a, used_b, ious = set(), set(), []
    for value, i, j in pairs:
        if value <= 0:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            ious.append(value)
    return ious, len(boxes_a) - len(used_a), len(boxes_b) - len(used_b)


def kept_boxes(faces, row):
    return [clip_box(face[:4], row["width"], row["height"]) for face in faces if face[4] >= MIN_CONFIDENCE]


def percentiles(values):
    if not values:
        return "-"
    p50, p95 = np.percentile(values, [50, 95])
    return f"{p50 * 1000:.0f} / {p95 * 1000:.0f}"


def summary_row(name, counted, turns, best_a, reference, by_file, peak_rss):
    """One line of the table for an engine; `best_a` is A's best-pass images/s per core."""
    wall = sum(turn["wall"] for turn in turns)
    cpu = sum(turn["cpu"] for turn in turns)
    images = sum(len(turn["results"]) for turn in turns)
    best = len(turns[0]["results"]) / min(turn["wall"] for turn in turns)
    other = (sum(turn["machine_cpu"] for turn in turns) - cpu) / wall
    latency = {"large": [], "small": []}
    for result in (r for turn in turns for r in turn["results"]):
        row = by_file[result["file"]]
        side = max(row["width"], row["height"])
        if side >= LARGE_SIDE:
            latency["large"].append(result["seconds"])
        elif SMALL_SIDES[0] <= side <= SMALL_SIDES[1]:
            latency["small"].append(result["seconds"])

    kept = {f: kept_boxes(faces, by_file[f]) for f, faces in reference[name].items()}
    found = sum(len(boxes) for f, boxes in kept.items() if by_file[f]["faces"])
    false = sum(len(boxes) for f, boxes in kept.items() if not by_file[f]["faces"])
    expected = sum(row["faces"] for row in by_file.values())
    agreement = "(reference)"
    if name != "A":
        ious, only_a, only_here = [], 0, 0
        for f, boxes in kept.items():
            values, missed, extra = match(kept_boxes(reference["A"][f], by_file[f]), boxes)
            ious, only_a, only_here = ious + values, only_a + missed, only_here + extra
        agreement = f"{np.mean(ious):.3f} / {min(ious):.3f} ({only_a} A-only, {only_here} {name}-only)" if ious else "-"
    return (
        name, str(counted), f"{best:.2f}", f"{images / wall:.2f}", f"{best / counted:.2f}",
        f"{best / counted / best_a:.2f}x", f"{cpu / images * 1000:.0f}", f"{cpu / wall:.2f}", f"{other:.2f}",
        percentiles(latency["large"]), percentiles(latency["small"]),
        f"{found} / {expected}", str(false), agreement, f"{peak_rss:.0f}",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3, help="measured passes over all photos (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-pass photo orders")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="folder with the photos and faces.tsv")
    parser.add_argument("--worker", choices=("A", "B", "C", "C0"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve(args.worker, args.photos)

    rows = read_table(args.photos)
    by_file = {row["file"]: row for row in rows}
    files = [row["file"] for row in rows]
    cores = os.cpu_count() or 1
    engines = {"A": cores, "B": 1, "C": 1, "C0": 1, "Cx2": 2}
    load_before = os.getloadavg()[0]
    began = time.perf_counter()

    workers = {name: Worker(engine, args.photos) for name, engine in (("A", "A"), ("B", "B"), ("C", "C"), ("C0", "C0"), ("C2", "C"))}
    for worker in workers.values():
        worker.receive()
    loaded = time.perf_counter()
    for worker in workers.values():
        worker.send({"files": files})
    reference = {name: {r["file"]: r["faces"] for r in w.receive()["results"]} for name, w in workers.items()}
    reference["Cx2"] = reference["C2"]
    warmed = time.perf_counter()

    pools = {"A": [workers["A"]], "B": [workers["B"]], "C": [workers["C"]], "C0": [workers["C0"]],
             "Cx2": [workers["C"], workers["C2"]]}
    turns = {name: [] for name in engines}
    unstable = set()
    rng = random.Random(args.seed)
    names = list(engines)
    for number in range(args.passes):
        order = rng.sample(files, len(files))
        for name in names[number % len(names) :] + names[: number % len(names)]:
            turn = run_queue(pools[name], order)
            turns[name].append(turn)
            unstable |= {(name, r["file"]) for r in turn["results"] if r["faces"] != reference[name][r["file"]]}

    for worker in workers.values():
        worker.send({"stats": True})
    stats = {name: worker.receive()["peak_rss_mb"] for name, worker in workers.items()}
    for worker in workers.values():
        worker.close()
    stats["Cx2"] = max(stats["C"], stats["C2"])

    best_a = len(files) / min(turn["wall"] for turn in turns["A"]) / engines["A"]
    header = ("engine", "cores", "img/s best", "img/s all", "best/core", "vs A/core", "CPU ms/img", "busy cores",
              "other load", "1920px p50/p95 ms", "~500px p50/p95 ms", "faces", "false", "IoU vs A mean/min (unmatched)",
              "peak RSS MB")
    table = [
        summary_row(name, counted, turns[name], best_a, reference, by_file, stats[name])
        for name, counted in engines.items()
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    print(f"\n{len(files)} photos x {args.passes} measured passes, {cores} cores; confidence >= {MIN_CONFIDENCE}\n")
    for line in [header, ["-" * w for w in widths], *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())

    print("\nPer photo: faces by eye / A / B / C, and C's boxes against A's (IoU of matched pairs)")
    for f in files:
        row = by_file[f]
        boxes_a, boxes_b, boxes_c = (kept_boxes(reference[name][f], row) for name in ("A", "B", "C"))
        ious, _, _ = match(boxes_a, boxes_c)
        mark = " <- differs" if not (len(boxes_a) == len(boxes_b) == len(boxes_c) == row["faces"]) else ""
        print(f"  {f:27} {row['width']:>4}x{row['height']:<4} {row['faces']} / {len(boxes_a)} / {len(boxes_b)}"
              f" / {len(boxes_c)}  IoU {' '.join(f'{v:.3f}' for v in ious) or '-'}{mark}")
    if any(reference["C"][f] != reference["C2"][f] for f in files):
        print("\nNote: the two C processes returned different detections for some photos.")
    for name, f in sorted(unstable):
        print(f"Note: {name} returned different detections for {f} in a measured pass than in warm-up.")
    done = time.perf_counter()
    print(f"\nWall time: {loaded - began:.0f} s to load, {warmed - loaded:.0f} s to warm up, "
          f"{done - warmed:.0f} s measured; {done - began:.0f} s in all.")
    # Other processes on a 2-core machine skew every figure; this says whether the run was clean.
    print(f"1-min load average: {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after it.")


if __name__ == "__main__":
    sys.exit(main())

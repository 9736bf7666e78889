"""Where the detect task's time goes besides detection: each step of `workers.tasks.detect_faces`
timed in one process, and the share of the task the detector's ceiling work takes.

Run from the repository root:  .venv/bin/python -m bench.detect_task [--passes 3] [--engine onnx]
                                [--storage filesystem|s3]

The photos of tests/photos/ are submitted through `pipeline.submit` (stored, rows written, nothing
published) to a database of the run's own (`face_detect_bench_task_<pid>`, dropped at the end)
and filesystem storage in a temporary directory (`--storage s3`: a bucket on a SeaweedFS S3 server
of the run's own, stack.S3Server: the real protocol over HTTP with signatures checked, as MinIO
speaks it), then each is run through `detect_faces.apply()`:
the task's own code in this process, without Celery's transport (broker, prefork pipe, ack).
Every step the task calls is wrapped by bench.ingest_profile's exclusive timers (wall and this
thread's CPU, ms per photo); the task's own row is what the steps inside it do not take.

`decode + find_faces` is what the pipeline benchmark's ceiling process does per photo, so
`ceiling share` = (decode + find_faces) / task is the most a detection core can deliver of the
ceiling through this task, before any Celery overhead. `waiting` (wall - CPU) is the time the task
leaves its core idle, on storage and the database: what a second process on the core can fill.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

from bench.stack import PHOTOS, Cleanup, install_signal_handlers, photo_names, start_s3, table
from stack import Database

STEPS = (  # (module, function, label), in the order the task calls them
    ("workers.pipeline", "claim", "claim (UPDATE, SELECT)"),
    ("workers.tasks", "_read_original", "read the original"),
    ("workers.detection", "load_upright_rgb", "decode"),
    ("workers.detection", "find_faces", "find_faces"),
    ("workers.face_quality", "describe_all", "pose + quality"),
    ("workers.drawing", "annotate_image", "draw + encode"),
    ("api.storage", "put", "store the annotated image"),
    ("workers.pipeline", "finish", "finish (faces + done, one transaction)"),
)
REST = "the task's own code and Celery's apply()"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--engine", choices=("onnx", "tensorflow"), default="onnx")
    parser.add_argument("--storage", choices=("filesystem", "s3"), default="filesystem")
    args = parser.parse_args()

    install_signal_handlers()
    cleanup = Cleanup()
    db_name = f"face_detect_bench_task_{os.getpid()}"
    media = tempfile.mkdtemp(prefix="bench-detect-task-")
    cleanup.add("media", lambda: shutil.rmtree(media, ignore_errors=True))
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "face_detect_api.settings", "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{db_name}",
        "STORAGE_BACKEND": "filesystem", "MEDIA_ROOT": media, "DETECT_ENGINE": args.engine, "LOG_LEVEL": "WARNING",
        "SECRET_KEY": "bench-not-a-secret-0123456789abcdefghijklmnopqrstuvwxyz", "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    try:
        if args.storage == "s3":
            s3 = start_s3(cleanup)
            os.environ.update(s3.env(s3.make_bucket("bench-detect-task")))
        cleanup.add("database", Database(db_name).drop)
        for command in (["ensure_database"], ["migrate", "--no-input", "-v", "0"]):
            subprocess.run([sys.executable, "manage.py", *command], check=True, capture_output=True, timeout=120)
        run(args)
    finally:
        cleanup.run()


def run(args):
    import importlib

    import django

    django.setup()
    from api.models import Client, Image
    from api.uploads import inspect_image
    from bench.ingest_profile import TIMERS, wrap
    from workers import pipeline, tasks

    for module, name, label in STEPS:
        wrap(importlib.import_module(module), name, label)
    pipeline.enqueue = lambda *a, **kw: True  # rows only: nothing is published

    client, _key = Client.create_with_credentials("bench-detect-task")
    photos = [(PHOTOS / name).read_bytes() for name in photo_names()]

    faces = [0]

    def one_pass():
        ids = [pipeline.submit(client, {}, data=data, inspected=inspect_image(data))[0].pk for data in photos]
        TIMERS.enabled = True
        for image_id in ids:
            TIMERS.enter(REST)  # exclusive timers: what the steps inside do not take
            try:
                tasks.detect_faces.apply(args=(str(image_id),), task_id=str(uuid.uuid4()))
            finally:
                TIMERS.exit()
        TIMERS.enabled = False
        faces[0] += sum(Image.objects.get(pk=image_id).face_count for image_id in ids)
        return len(ids)

    one_pass()  # warm-up: the engine's first calls, the connection
    TIMERS.acc.clear()
    faces[0] = 0
    count = sum(one_pass() for _ in range(args.passes))

    labels = [label for _m, _n, label in STEPS] + [REST]
    per_photo = {label: (TIMERS.acc[label][0] / count * 1000, TIMERS.acc[label][1] / count * 1000) for label in labels}
    task_wall, task_cpu = (sum(values[i] for values in per_photo.values()) for i in (0, 1))
    rows = [[label, f"{wall:.2f}", f"{cpu:.2f}", f"{wall / task_wall:.1%}"] for label, (wall, cpu) in per_photo.items()]
    rows.append(["task", f"{task_wall:.2f}", f"{task_cpu:.2f}", "100%"])
    print(f"{count} photos ({len(photos)} x {args.passes} passes), engine {args.engine}, storage {args.storage},"
          " one process; ms per photo\n")
    print(table(["step", "wall ms", "CPU ms", "share"], rows))
    ceiling = per_photo["decode"][0] + per_photo["find_faces"][0]
    print(f"\nceiling share: (decode + find_faces) / task = {ceiling:.1f} / {task_wall:.1f} = {ceiling / task_wall:.2f}"
          " (the most a detection core can deliver of the ceiling through this task, before Celery's transport)")
    described = TIMERS.acc["pose + quality"]
    print(f"pose + quality: {described[1] / max(faces[0], 1) * 1000:.2f} ms CPU per face ({faces[0]} faces,"
          f" {described[0] / max(faces[0], 1) * 1000:.2f} ms wall)")
    print(f"waiting: wall - CPU = {task_wall - task_cpu:.1f} ms = {(task_wall - task_cpu) / task_wall:.1%} of the task"
          " (its core idle, unless another process fills it)")


if __name__ == "__main__":
    main()

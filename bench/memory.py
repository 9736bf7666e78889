"""Memory (RSS) of every process of the platform, at rest and under a long run of mixed-size photos.

Run from the repository root:
    .venv/bin/python -m bench.memory [--images 500] [--concurrency 2] [--sizes 12] [--clients 6]
        [--max-tasks-per-child N] [--max-memory-per-child-mb N] [--engine tensorflow|onnx]

With no --engine, every engine the settings know (DETECT_ENGINE: onnx and tensorflow) is measured,
one after the other, each on a fresh stack (the first one is stopped before the next starts).

What runs
  One whole stack (bench/stack.py: the Procfile's gunicorn with 4 sync workers, the detect worker
  with WORKER_CONCURRENCY=2, the callbacks worker and beat, as `make run` starts them, on a
  database, RabbitMQ vhost and filesystem MEDIA_ROOT of its own). WORKER_MAX_TASKS_PER_CHILD and
  WORKER_MAX_MEMORY_PER_CHILD_MB keep the platform's defaults unless given: each image is one
  task on the detect queue (detect_faces), so a child that has run N tasks has seen about N
  images.

Images
  The photos of tests/photos/ as they are, plus each of them resized (bilinear, JPEG quality 90)
  to --sizes long sides spaced geometrically from 240 to 2400 px, so the detector sees many input
  shapes (after the platform's downscale to 1024 px, every photo still has its own aspect ratio
  and every size under 1024 its own shape). --images uploads are drawn from them in a shuffled
  cycle and submitted over HTTP by --clients closed-loop clients (each uploads its next image
  when the callback of its previous one has arrived), each with a callback to a local receiver.

Sampled
  VmRSS (/proc/<pid>/status) of every process of the stack every second, by kind: gunicorn master,
  gunicorn workers, detect parent, detect pool children, callbacks worker, beat. Reported per kind:
  at rest after start (before any image), after the first half of the images, after all of them,
  the peak, and at rest afterwards; per process (the largest one of the kind) and summed over the
  kind. "bounded" compares the largest RSS of the kind in the second half of the run with the
  first half (grows < 10 %: yes). Pool child recycling is read from the child PIDs (a new PID
  is a new child); the tasks each child ran come from the worker's log, which tells whether it was
  recycled for WORKER_MAX_TASKS_PER_CHILD or for WORKER_MAX_MEMORY_PER_CHILD_MB.
  "other load" is the machine's CPU time (/proc/stat) minus the benchmark's own processes, the
  shared services and PostgreSQL backends of its database, per second of the run.
"""

import argparse
import io
import json
import os
import random
import sys
import threading
import time

from bench.stack import (
    OTHER_LOAD_LIMIT,
    PHOTOS,
    BenchStack,
    Cleanup,
    CpuMeter,
    RssSampler,
    TimedReceiver,
    detect_engines,
    log,
    photo_names,
    run_benchmark,
    run_clients,
    submit,
    table,
    uptime,
    wait_quiet,
)

KINDS = ("gunicorn master", "gunicorn workers", "detect parent", "detect children", "callbacks", "beat")


def make_images(sizes, smallest=240, largest=2400):
    """[(file name, bytes, (width, height))]: the originals and their resized JPEG variants."""
    import PIL.Image
    import PIL.ImageOps

    sides = sorted({round(smallest * (largest / smallest) ** (i / max(1, sizes - 1))) for i in range(sizes)})
    images = []
    for name in photo_names():
        data = (PHOTOS / name).read_bytes()
        with PIL.Image.open(io.BytesIO(data)) as opened:
            original = PIL.ImageOps.exif_transpose(opened).convert("RGB")
        images.append((name, data, original.size))
        width, height = original.size
        for side in sides:
            scale = side / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            if min(size) < 16:
                continue
            out = io.BytesIO()
            original.resize(size, PIL.Image.Resampling.BILINEAR).save(out, "JPEG", quality=90)
            images.append((f"{name.rsplit('.', 1)[0]}_{side}.jpg", out.getvalue(), size))
    return images, sides


def child_tasks(log_text):
    """{pid: tasks run} of the detect pool children, from the worker's JSON log."""
    counts = {}
    for line in log_text.splitlines():
        if not line.startswith("{") or '"celery.app.trace"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "runtime" in (entry.get("data") or {}):
            counts[entry.get("process")] = counts.get(entry.get("process"), 0) + 1
    return counts


def child_pids_seen(samples):
    pids = []
    for sample in samples:
        for pid in sample[2].get("detect children", {}):
            if pid not in pids:
                pids.append(pid)
    return pids


def ready_delays(log_text, pids):
    """{pid: seconds from the child's fork (/proc starttime) to its "detector ready" log line}."""
    import datetime

    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    clk = os.sysconf("SC_CLK_TCK")
    ready = {}
    for line in log_text.splitlines():
        if '"detector ready"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        pid = entry.get("process")
        if pid not in pids:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        started = btime + int(data[data.rfind(b")") + 2:].split()[19]) / clk
        at = datetime.datetime.strptime(entry["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        ready[pid] = at - started
    return ready


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500, help="images pushed through (default 500)")
    parser.add_argument("--concurrency", type=int, default=2, help="WORKER_CONCURRENCY (default 2)")
    parser.add_argument("--sizes", type=int, default=12, help="resized variants per photo, 240-2400 px (default 12)")
    parser.add_argument("--clients", type=int, default=6, help="closed-loop upload clients (default 6)")
    parser.add_argument("--api-workers", type=int, default=4, help="gunicorn sync workers (default 4, as make run)")
    parser.add_argument("--max-tasks-per-child", type=int, help="WORKER_MAX_TASKS_PER_CHILD (default: the platform's)")
    parser.add_argument("--max-memory-per-child-mb", type=int, help="WORKER_MAX_MEMORY_PER_CHILD_MB (default: the platform's)")
    parser.add_argument("--engine", choices=("onnx", "tensorflow"),
                        help="only this DETECT_ENGINE (default: every engine the settings know)")
    parser.add_argument("--rest", type=float, default=6.0, help="seconds sampled at rest before and after (default 6)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="seconds to wait before the run for other people's load to drop (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.engine and detect_engines() == ["default"]:
        parser.error("--engine: face_detect_api/settings.py has no DETECT_ENGINE")

    return run_benchmark(run, args)


def nearest(samples, when):
    """The first sample taken at or after `when` (else the last one)."""
    for sample in samples:
        if sample[0] >= when:
            return sample
    return samples[-1]


def kind_values(sample, kind):
    values = list(sample[2].get(kind, {}).values())
    return (max(values), sum(values)) if values else (float("nan"), float("nan"))


def run(args, cleanup, began, up_before):
    log("making the mixed-size images")
    images, sides = make_images(args.sizes)
    rng = random.Random(args.seed)
    sequence = []
    while len(sequence) < args.images:
        sequence += rng.sample(images, len(images))
    sequence = sequence[: args.images]

    engines = [args.engine] if args.engine else [e for e in detect_engines() if e != "default"] or ["default"]
    for engine in engines:
        inner = Cleanup()  # this engine's stack goes before the next one starts
        cleanup.add(f"stack {engine}", inner.run)
        try:
            measure(args, engine, images, sides, sequence, inner)
        finally:
            inner.run()
    print(f"\nWall time {time.perf_counter() - began:.0f} s so far (cleanup follows).")
    print(f"uptime before: {up_before}")
    print(f"uptime after:  {uptime()}")
    return 0



def measure(args, engine, images, sides, sequence, cleanup):
    """One stack with this engine: RSS at rest, over the run and after; prints the tables."""
    env = {}
    if args.max_tasks_per_child:
        env["WORKER_MAX_TASKS_PER_CHILD"] = str(args.max_tasks_per_child)
    if args.max_memory_per_child_mb:
        env["WORKER_MAX_MEMORY_PER_CHILD_MB"] = str(args.max_memory_per_child_mb)
    if engine != "default":
        env["DETECT_ENGINE"] = engine
        if engine == "onnx":
            from bench.pipeline import ensure_models

            env["ONNX_MODEL_DIR"] = str(ensure_models(["onnx"], cleanup))
    tag = str(os.getpid())
    stack = BenchStack(f"mem{engine[:4]}", tag, cleanup, env=env, api_workers=args.api_workers, concurrency=args.concurrency)
    receiver = TimedReceiver()
    cleanup.add("receiver", receiver.close)
    log("starting the stack")
    stack.start()
    max_tasks, max_mem = map(int, stack.stack.manage(
        "shell", "-c", "from django.conf import settings as s; "
        "print(s.WORKER_MAX_TASKS_PER_CHILD, s.WORKER_MAX_MEMORY_PER_CHILD_MB)").split()[-2:])

    done = []  # arrival times of callbacks, in order
    done_lock = threading.Lock()
    sampler = RssSampler(stack, progress=lambda: len(done))
    cleanup.add("sampler", sampler.stop)
    sampler.start()
    first_children = set(stack.processes().get("detect children", []))
    log(f"sampling at rest for {args.rest:.0f} s")
    time.sleep(args.rest)
    rest_end = time.perf_counter()

    wait_quiet(lambda: {"stack": stack.all_pids()}, [stack.db_name], max_wait=args.quiet_wait)
    log(f"pushing {args.images} images through ({len(images)} distinct, long sides {sides[0]}-{sides[-1]} px)")
    import requests

    queue = list(enumerate(sequence))
    queue_lock = threading.Lock()
    errors, kinds_seen = [], {"image.done": 0, "image.failed": 0}
    deadline = time.perf_counter() + 60 + 3 * args.images
    meter = CpuMeter([stack.db_name]).start()
    started = time.perf_counter()

    def client():
        session = requests.Session()
        while True:
            with queue_lock:
                if not queue or errors:
                    return
                index, (name, data, _) = queue.pop(0)
            request_id = f"mem-{index}"
            path = f"/mem/{request_id}"
            try:
                submit(session, stack, name, data, request_id, receiver.url(path))
            except Exception as error:
                errors.append(error)
                return
            if receiver.wait([path], deadline):
                errors.append(RuntimeError(f"no callback for {request_id} before the deadline"))
                return
            arrived, kind = receiver.arrivals[path]
            with done_lock:
                done.append(arrived)
                kinds_seen[kind] = kinds_seen.get(kind, 0) + 1
            if len(done) % 50 == 0:
                log(f"{len(done)} images done")

    run_clients(client, args.clients, deadline, errors)
    if len(done) < args.images:
        raise RuntimeError(f"only {len(done)} of {args.images} images finished before the deadline")
    finished = time.perf_counter()
    wall, groups = meter.stop({"stack": stack.all_pids()})
    log(f"sampling at rest for {args.rest:.0f} s")
    time.sleep(args.rest)
    sampler.stop()
    last_children = set(stack.processes().get("detect children", []))
    tasks_by_pid = child_tasks(stack.log("detect"))

    samples = sampler.samples
    done.sort()
    half_time = done[len(done) // 2 - 1]
    rest = [s for s in samples if s[0] <= rest_end]
    first_half = [s for s in samples if started <= s[0] <= half_time]
    second_half = [s for s in samples if half_time < s[0] <= finished]
    after = [s for s in samples if s[0] > finished]
    at_half = nearest(samples, half_time)
    at_end = nearest(samples, finished)
    final = after[-1] if after else samples[-1]

    def peak(window, kind, use_sum=False):
        values = [kind_values(s, kind)[1 if use_sum else 0] for s in window]
        values = [v for v in values if v == v]
        return max(values) if values else float("nan")

    print()
    print(f"=== engine: {engine} ===")
    print(f"{args.images} images ({len(images)} distinct: {len(photo_names())} photos as they are + resized to "
          f"{', '.join(map(str, sides))} px long side), {args.clients} closed-loop clients, "
          f"WORKER_CONCURRENCY={args.concurrency}, WORKER_MAX_TASKS_PER_CHILD={max_tasks}, "
          f"WORKER_MAX_MEMORY_PER_CHILD_MB={max_mem}, gunicorn {args.api_workers} sync workers; "
          f"{len(samples)} RSS samples, 1 per second")
    print(f"{args.images} images in {finished - started:.0f} s = {args.images / (finished - started):.2f} img/s; "
          f"{kinds_seen.get('image.done', 0)} done, {kinds_seen.get('image.failed', 0)} failed; "
          f"other load {groups['other'] / wall:.2f} cores (machine {groups['machine'] / wall:.2f}, "
          f"benchmark stack {groups.get('stack', 0) / wall:.2f}, bench client {groups.get('bench', 0) / wall:.2f}, "
          f"PostgreSQL {groups.get('pg', 0) / wall:.2f}, services {groups.get('services', 0) / wall:.2f})"
          + ("" if groups["other"] / wall <= OTHER_LOAD_LIMIT else "  <- other people's load was high: re-run"))
    print()
    half = len(done) // 2
    header = ("process kind", "procs", "at rest", f"after {half}", f"after {len(done)}", "peak", "final at rest",
              "peak 1st half", "peak 2nd half", "bounded")
    rows = []
    for kind in KINDS:
        pids = {pid for s in samples for pid in s[2].get(kind, {})}
        if not pids:
            continue

        def cell(sample):
            biggest, total = kind_values(sample, kind)
            return f"{biggest:.0f}" if len(sample[2].get(kind, {})) <= 1 else f"{biggest:.0f} / {total:.0f}"

        p1, p2 = peak(first_half, kind), peak(second_half, kind)
        bounded = "yes" if p2 <= p1 * 1.10 else f"no (+{(p2 / p1 - 1) * 100:.0f} %)"
        many = any(len(s[2].get(kind, {})) > 1 for s in samples)
        peak_cell = f"{peak(samples, kind):.0f}" + (f" / {peak(samples, kind, True):.0f}" if many else "")
        rows.append((kind, str(len(pids)), cell(rest[-1] if rest else samples[0]), cell(at_half), cell(at_end),
                     peak_cell, cell(final), f"{p1:.0f}", f"{p2:.0f}", bounded))
    print("RSS in MB (kinds with several processes: largest process / sum of the kind)")
    print(table(header, rows))
    if set(child_pids_seen(samples)) != first_children:
        print("Pool children were recycled during the run, so the halves of the detect children compare old and "
              "fresh children;\n--max-tasks-per-child 100000 shows their growth without recycling.")

    # Recycling of the pool children.
    child_pids = child_pids_seen(samples)
    print()
    recycled = set(child_pids) != first_children or last_children != first_children
    print(f"Pool child PIDs at start {sorted(first_children)}, at the end {sorted(last_children)}; "
          f"{len(child_pids)} children seen: recycling {'happened' if recycled else 'did not happen'}.")
    header = ("child pid", "first seen at image", "last seen at image", "images (tasks) run", "RSS first / peak / last MB",
              "ended because")
    rows = []
    for pid in child_pids:
        seen = [s for s in samples if pid in s[2].get("detect children", {})]
        rss = [s[2]["detect children"][pid] for s in seen]
        tasks = tasks_by_pid.get(pid, 0)
        if pid in last_children:
            reason = "still running"
        elif tasks >= max_tasks:
            reason = f"WORKER_MAX_TASKS_PER_CHILD ({max_tasks})"
        elif rss and rss[-1] > max_mem:
            reason = f"WORKER_MAX_MEMORY_PER_CHILD_MB ({max_mem})"
        else:
            reason = "exited (cause not in the log)"
        rows.append((str(pid), str(seen[0][1]), str(seen[-1][1]), str(tasks),
                     f"{rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f}", reason))
    print(table(header, rows))
    ready = ready_delays(stack.log("detect"), [pid for pid in child_pids if pid not in first_children])
    if ready:
        print("Replacement children: detector ready " + ", ".join(f"{d:.1f} s" for d in ready.values())
              + " after the fork (the tasks queued meanwhile wait for the other child or for it).")

    # The course of the run, every 50 images.
    print("\nRSS over the run (MB; kinds with several processes: sum; children: each child by PID order):")
    header = ("images done", "t s", *KINDS)
    rows = []
    marks = sorted({0, *range(50, len(done) + 1, 50), len(done)})
    for mark in marks:
        s = (rest[-1] if rest else samples[0]) if mark == 0 else nearest(samples, done[mark - 1])
        cells = []
        for kind in KINDS:
            values = s[2].get(kind, {})
            if kind == "detect children":
                cells.append(" ".join(f"{values[p]:.0f}" for p in sorted(values)) or "-")
            else:
                cells.append(f"{sum(values.values()):.0f}" if values else "-")
        rows.append((str(mark), "rest" if mark == 0 else f"{s[0] - started:.0f}", *cells))
    print(table(header, rows))


if __name__ == "__main__":
    sys.exit(main())

"""The upload endpoint alone under concurrent load, side by side with a plain DRF baseline.

Run from the repository root:  .venv/bin/python -m bench.ingest [--storage filesystem|s3]
    [--connections 8] [--duration 15] [--warmup 3] [--rounds 2] [--variants platform,baseline,tuned]
    [--client auto|wrk|python] [--workers 4] [--gunicorn-args '...'] [--reruns 1] [--budget 150]
    [--profile-requests 100] [--patch-effects] [--no-profile]
(TUNED_PATCHES=publish,fswrite,... in the environment limits the tuned variant to those patches.)

What it builds (all of it its own, all of it removed at the end)
  - a PostgreSQL database `face_detect_bench_<pid>` (`manage.py ensure_database` + `migrate`),
  - a RabbitMQ vhost per variant, `face_detect_bench_<pid>_<variant>`, with nothing consuming it,
    so every confirmed message stays there to be counted,
  - a temporary MEDIA_ROOT per variant (STORAGE_BACKEND=filesystem), or with `--storage s3` a
    SeaweedFS S3 server (stack.S3Server, signatures checked) with one bucket per variant,
  - Redis database 13 for the rate-limit cache (THROTTLE_RATE=1000000/s: never limits),
  - one client per variant (`manage.py create_client`),
  - one gunicorn per variant, `--workers 4 --no-control-socket` (sync workers), on a free port;
    or, for a variant named `<variant>@granian`, one granian (`--interface wsgi --workers 4
    --blocking-threads 1 --runtime-mode st`: one Python thread per worker process, as gunicorn's
    sync workers; granian's HTTP handling is Rust and keeps connections alive).

Variants
  platform  `face_detect_api.wsgi:application`, the platform unchanged: POST /api/v1/images/ with
            `Authorization: Bearer <key>`.
  baseline  `bench.plain_wsgi:application` (bench/plain_settings.py, bench/plain_urls.py): a plain
            DRF APIView doing the same work and nothing else: multipart parse, Pillow header
            read, storage write (the platform's storage classes), row insert into the same
            `api_image` table, Celery `send_task` with publisher confirms after the commit. No
            auth, throttle or middleware.
  tuned     `bench.tuned_wsgi:application`: the platform's own code with the optimizations
            proposed by this benchmark applied as monkeypatches (bench/tuned_*.py; the platform's
            files are untouched). It shows what they would buy.
  <variant>@granian  the same application served by granian instead of gunicorn (the app server
            is the one part of the stack under the endpoint that can change without touching
            the platform's code): e.g. `--variants platform,baseline,platform@granian`.

Load
  `wrk` (one thread, N connections) with a Lua script that POSTs real multipart uploads of a few
  small JPEGs (photos of tests/photos/ downscaled to 320 px in memory), or, without wrk (or with
  --client python), a Python generator: N threads, raw sockets, prebuilt requests. gunicorn's sync
  workers close the connection after every response, so both clients reconnect per request.
  Each variant gets a warm-up before its first measured phase; then the phases alternate
  (platform, baseline, tuned, platform, baseline, tuned, ...) so machine noise hits all of them.

Measured per phase
  req/s, p50/p90/p99/max latency, 2xx, non-2xx, socket errors; CPU milliseconds per request of
  each process group (this gunicorn, PostgreSQL backends of the bench database, PostgreSQL's own
  background processes, RabbitMQ, Redis, the load generator, the S3 server) from /proc, and "foreign" cores:
  CPU used during the phase by everything else (other people's tests). `load1` is /proc/loadavg
  before the phase (it includes the benchmark's own previous phase). A phase with more than 0.25
  foreign cores is re-run once when the time budget (--budget) allows; the summary uses the clean
  phases, and the note names the two foreign processes that used most CPU.

Verified at the end, per variant
  rows in api_image (and rows with enqueued_at set) = stored objects = messages on the variant's
  queue (passive queue_declare on the variant's vhost) = 2xx responses (+ requests wrk had in flight
  when its clock ran out: they were sent, and the server completed them, but wrk closed the
  connection before reading the answer; the Python client finishes its in-flight requests).

Then (unless --no-profile) `bench.ingest_profile` runs in a subprocess with the platform's
environment: a per-request breakdown of the upload's CPU and wall time by component, from a few
hundred requests through the WSGI application in-process, plus isolated costs of the pieces.
"""

import argparse
import io
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.stack import (
    Cleanup,
    all_pids,
    children_map,
    free_port,
    install_signal_handlers,
    listener_pid,
    log,
    machine_busy_ticks,
    read_stat,
    start_s3,
    stop_process_group,
)
from stack import Database, Vhost

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PHOTOS = ROOT / "tests" / "photos"
SMALL_PHOTOS = ("clm_audrey.jpg", "mpl_grace_hopper.jpg", "opencv_home.jpg", "vlad_sample1.jpg")
BOUNDARY = "----benchingestboundary7MA4YWxkTrZu0gW"
REDIS_DB = 13
THROTTLE_RATE = "1000000/s"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FOREIGN_LIMIT = 0.25  # cores used by other people's processes during a phase before it counts as noisy


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run(cmd, env=None, timeout=60, check=True):
    result = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


# --- Test images and request bodies ---------------------------------------------------------


def small_jpegs(side=320):
    import PIL.Image

    images = []
    for name in SMALL_PHOTOS:
        with PIL.Image.open(PHOTOS / name) as photo:
            photo = photo.convert("RGB")
            photo.thumbnail((side, side))
            out = io.BytesIO()
            photo.save(out, format="JPEG", quality=85)
            images.append((name, out.getvalue()))
    return images


def multipart_body(filename, data):
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def raw_request(host, path, auth, body):
    headers = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        f"Content-Length: {len(body)}",
    ]
    if auth:
        headers.append(f"Authorization: Bearer {auth}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


# --- CPU accounting from /proc ---------------------------------------------------------------

def proc_snapshot():
    """pid -> (comm, ppid, cpu ticks, cmdline for postgres processes, reaped children's ticks).
    The reaped children's CPU counts PostgreSQL backends closed mid-phase (CONN_MAX_AGE) through
    their postmaster."""
    table = {}
    for pid in all_pids():
        stat = read_stat(pid)
        if stat is None:
            continue
        comm, ppid, ticks, reaped = stat
        cmdline = ""
        if comm == "postgres":
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
        table[pid] = (comm, ppid, ticks, cmdline, reaped)
    return table


class CpuMeter:
    """CPU per process group between start() and stop(), in seconds."""

    def __init__(self, db_name, own_pids):
        self.db_name = db_name
        self.own_pids = own_pids  # name -> set of pids (servers, the S3 server, bench)
        self.pg_main = listener_pid(5432, {"postgres"})
        self.rabbit_main = listener_pid(5672, {"beam.smp"})
        self.redis_main = listener_pid(6379, {"redis-server"})

    def classify(self, pid, comm, ppid, cmdline, server_pids):
        """Our processes by pid; the shared services by the instance on their standard port (the
        fault tests start private PostgreSQL/RabbitMQ/Redis instances: those count as foreign)."""
        if pid in server_pids:
            return "api"
        for name, pids in self.own_pids.items():
            if pid in pids:
                return name
        if comm == "postgres" and self.pg_main in (pid, ppid):
            if f" {self.db_name} " in cmdline:
                return "pg"
            if "(" in cmdline:  # a client backend of another database
                return "foreign"
            return "pg_aux"
        if self.rabbit_main in (pid, ppid) or comm == "epmd":
            return "rabbit"
        if pid == self.redis_main:
            return "redis"
        if ppid == 2 or pid == 2:  # kernel threads: writeback, journal, network; partly induced by us
            return "kernel"
        return "foreign"

    def start(self):
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_ticks()
        self.snap0 = proc_snapshot()
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self, server_pids, client_is_child):
        snap1 = proc_snapshot()
        busy1 = machine_busy_ticks()
        wall = time.perf_counter() - self.t0
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        groups = {}
        foreign = {}
        for pid, (comm, ppid, ticks, cmdline, child_ticks) in snap1.items():
            before = self.snap0.get(pid)
            delta = ticks - (before[2] if before and before[0] == comm else 0)
            if pid == os.getpid():
                continue
            if pid == self.pg_main and before:
                # Backends that exited during the phase (CONN_MAX_AGE closes ours every 60 s):
                # their whole life lands in the postmaster's reaped-children time, so take off
                # what they had already used when the phase began.
                gone = sum(t[2] for p, t in self.snap0.items() if t[0] == "postgres" and t[1] == pid and p not in snap1)
                groups["pg"] = groups.get("pg", 0.0) + max(0, child_ticks - before[4] - gone) / CLK_TCK
            group = self.classify(pid, comm, ppid, cmdline, server_pids)
            groups[group] = groups.get(group, 0.0) + delta / CLK_TCK
            if group == "foreign" and delta:
                name = "postgres(other db)" if comm == "postgres" else comm
                foreign[name] = foreign.get(name, 0.0) + delta / CLK_TCK
        self.foreign_top = sorted(foreign.items(), key=lambda item: -item[1])[:2]
        own = (self1.ru_utime + self1.ru_stime) - (self.self0.ru_utime + self.self0.ru_stime)
        kids = (children1.ru_utime + children1.ru_stime) - (self.children0.ru_utime + self.children0.ru_stime)
        groups["client"] = groups.get("client", 0.0) + (kids if client_is_child else own)
        if client_is_child:
            groups["bench"] = own
        total = (busy1 - self.busy0) / CLK_TCK
        groups["unattributed"] = max(0.0, total - sum(groups.values()))
        return wall, total, groups


# --- Load generators -------------------------------------------------------------------------

WRK_LUA = r"""
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local host, path, auth = args[1], args[2], args[3]
  local headers = {
    ["Host"] = host,
    ["Content-Type"] = "multipart/form-data; boundary=" .. args[4],
  }
  if auth ~= "-" then headers["Authorization"] = "Bearer " .. auth end
  reqs = {}
  for i = 5, #args do
    local f = assert(io.open(args[i], "rb"))
    local body = f:read("*a")
    f:close()
    reqs[#reqs + 1] = wrk.format("POST", path, headers, body)
  end
  idx = 0
  sent, ok, bad, firstbad = 0, 0, 0, 0
end

function request()
  sent = sent + 1
  idx = idx % #reqs + 1
  return reqs[idx]
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    bad = bad + 1
    if firstbad == 0 then firstbad = status end
  end
end

function done(summary, latency, requests)
  local s, o, b, fb = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent")
    o = o + t:get("ok")
    b = b + t:get("bad")
    if fb == 0 then fb = t:get("firstbad") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"duration_s": %f, "sent": %d, "ok": %d, "bad": %d, "first_bad_status": %d, ' ..
    '"p50_ms": %f, "p90_ms": %f, "p99_ms": %f, "max_ms": %f, "errors": %d}\n',
    summary.duration / 1e6, s, o, b, fb,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, e.connect + e.read + e.write + e.timeout))
end
"""


class WrkClient:
    name = "wrk"
    is_child = True

    def __init__(self, workdir, bodies):
        self.script = workdir / "ingest.lua"
        self.script.write_text(WRK_LUA)
        self.body_files = []
        for i, body in enumerate(bodies):
            path = workdir / f"body{i}.bin"
            path.write_bytes(body)
            self.body_files.append(str(path))

    def run(self, port, path, auth, connections, duration):
        host = f"127.0.0.1:{port}"
        cmd = [
            "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "5s", "-s", str(self.script),
            f"http://{host}{path}", "--", host, path, auth or "-", BOUNDARY, *self.body_files,
        ]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=duration + 30)
        line = next((line for line in result.stdout.splitlines() if line.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result ({result.returncode}): {result.stdout[-1000:]} {result.stderr[-1000:]}")
        stats = json.loads(line[len("WRKJSON "):])
        # wrk calls request() once more per thread before the run, to check the script: not sent.
        stats["in_flight"] = max(0, stats["sent"] - 1 - stats["ok"] - stats["bad"])
        stats["completed"] = stats["ok"] + stats["bad"]
        return stats


class PythonClient:
    """N threads, each with its own connection, prebuilt request bytes, a minimal HTTP/1.1 reader.
    Every thread finishes its in-flight request after the deadline, so nothing is left over."""

    name = "python"
    is_child = False

    def __init__(self, workdir, bodies):
        self.bodies = bodies

    def run(self, port, path, auth, connections, duration):
        host = f"127.0.0.1:{port}"
        requests = [raw_request(host, path, auth, body) for body in self.bodies]
        deadline = time.perf_counter() + duration
        latencies, codes, errors = [], [], [0]
        lock = threading.Lock()

        def connect():
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, sock.makefile("rb")

        def worker(offset):
            my_lat, my_codes, k = [], [], offset
            sock = reader = None
            while time.perf_counter() < deadline:
                try:
                    if sock is None:
                        sock, reader = connect()
                    started = time.perf_counter()
                    sock.sendall(requests[k % len(requests)])
                    k += 1
                    status = int(reader.readline().split()[1])
                    length, close = 0, False
                    while True:
                        line = reader.readline()
                        if line in (b"\r\n", b""):
                            break
                        name, _, value = line.partition(b":")
                        name = name.strip().lower()
                        if name == b"content-length":
                            length = int(value)
                        elif name == b"connection" and value.strip().lower() == b"close":
                            close = True
                    reader.read(length)
                    my_lat.append(time.perf_counter() - started)
                    my_codes.append(status)
                    if close:
                        reader.close()
                        sock.close()
                        sock = None
                except (OSError, ValueError, IndexError):
                    with lock:
                        errors[0] += 1
                    if sock is not None:
                        sock.close()
                    sock = None
            if sock is not None:
                sock.close()
            with lock:
                latencies.extend(my_lat)
                codes.extend(my_codes)

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=duration + 30)
        elapsed = time.perf_counter() - started
        latencies.sort()

        def pct(p):
            if not latencies:
                return 0.0
            return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

        ok = sum(1 for c in codes if 200 <= c < 300)
        bad = len(codes) - ok
        return {
            "duration_s": elapsed, "sent": len(codes), "ok": ok, "bad": bad,
            "first_bad_status": next((c for c in codes if not 200 <= c < 300), 0),
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": (latencies[-1] * 1000) if latencies else 0,
            "errors": errors[0], "in_flight": 0, "completed": len(codes),
        }


# --- The isolated environment ----------------------------------------------------------------


class Server:
    def __init__(self, name, app, env, path, auth, workdir, kind="gunicorn"):
        self.name, self.app, self.env, self.path, self.auth, self.kind = name, app, env, path, auth, kind
        self.port = free_port()
        self.log_path = workdir / f"{kind}-{slug(name)}.log"
        self.proc = None

    def start(self, workers, extra=()):
        if self.kind == "granian":
            cmd = [
                str(BIN / "granian"), "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(workers), "--blocking-threads", "1", "--runtime-mode", "st", "--no-ws",
                "--log-level", "warning", self.app,
            ]
        else:
            cmd = [
                str(BIN / "gunicorn"), self.app, "--workers", str(workers), "--bind", f"127.0.0.1:{self.port}",
                "--no-control-socket", "--graceful-timeout", "5", "--timeout", "30", "--log-level", "warning", *extra,
            ]
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self):
        return {self.proc.pid, *children_map().get(self.proc.pid, [])}

    def wait_ready(self, workers, timeout=45):
        """Until every worker has booted (imported Django) and the port answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} {self.name} exited: {self.log_path.read_text()[-2000:]}")
            if len(self.pids()) > workers and self._answers():
                # Each worker imports the app before accepting: give the slowest a moment.
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.kind} {self.name} not ready after {timeout}s: {self.log_path.read_text()[-2000:]}")

    def _answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(f"GET /nothing-here HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nConnection: close\r\n\r\n".encode())
                return sock.recv(64).startswith(b"HTTP/1.")
        except OSError:
            return False

    def stop(self):
        if self.proc is not None:
            stop_process_group(self.proc)
            self.log_file.close()


def split_variant(variant):
    """platform@granian -> ("platform", "granian"); without a server named, gunicorn."""
    kind, _, server = variant.partition("@")
    return kind, server or "gunicorn"


def slug(variant):
    """A variant's name where names must be plain (buckets, vhosts, files): platform@granian ->
    platform-granian."""
    return variant.replace("@", "-")


def bench_name(variant):
    """The variant's client and bucket: bench-platform-granian."""
    return f"bench-{slug(variant)}"


def count_objects(storage, target):
    if storage == "s3":
        client, bucket = target
        return sum(1 for _ in client.list_objects(bucket, prefix="originals/", recursive=True))
    originals = Path(target) / "originals"
    return sum(1 for _ in originals.iterdir()) if originals.is_dir() else 0


def queue_depth(broker_url, queue):
    from kombu import Connection

    with Connection(broker_url, connect_timeout=5) as conn:
        channel = conn.channel()
        try:
            _name, messages, _consumers = channel.queue_declare(queue=queue, passive=True)
        except Exception as error:  # the queue was never declared: nothing was published
            if "NOT_FOUND" in str(error) or "404" in str(error):
                return 0
            raise
        finally:
            try:
                channel.close()
            except Exception:
                pass
        return messages


def db_counts(database_url):
    import psycopg

    with psycopg.connect(database_url, connect_timeout=10) as conn:
        rows = conn.execute(
            "select c.name, count(i.id), count(i.enqueued_at) from api_client c "
            "left join api_image i on i.client_id = c.id group by c.name"
        ).fetchall()
    return {name: (total, enqueued) for name, total, enqueued in rows}


def client_id(database_url, name):
    import psycopg

    with psycopg.connect(database_url, connect_timeout=10) as conn:
        return conn.execute("select id from api_client where name = %s", [name]).fetchone()[0]


def flush_throttle_keys():
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=5)
    keys = list(client.scan_iter(match="throttle:client:*", count=1000))
    if keys:
        client.delete(*keys)


# --- Reporting -------------------------------------------------------------------------------

GROUPS = ("api", "pg", "pg_aux", "rabbit", "redis", "client", "kernel", "s3")


def fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def print_phase_table(phases, groups):
    head = ["phase", "variant", "load1", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "2xx", "non-2xx", "sock err"]
    head += [f"{g} ms/r" for g in groups] + ["busy cores", "foreign", "note"]
    rows = []
    for p in phases:
        s = p["stats"]
        per = [f"{p['cpu'][g] * 1000 / max(1, s['completed']):.2f}" for g in groups]
        rows.append([
            p["label"], p["variant"], f"{p['load1']:.2f}", f"{p['rps']:.0f}", f"{s['p50_ms']:.1f}", f"{s['p90_ms']:.1f}",
            f"{s['p99_ms']:.1f}", f"{s['max_ms']:.0f}", s["ok"], s["bad"], s["errors"], *per,
            f"{p['busy_cores']:.2f}", f"{p['foreign_cores']:.2f}", p["note"],
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print(fmt_row(head, widths))
    for row in rows:
        print(fmt_row(row, widths))


def summarize(phases, variants):
    out = {}
    for variant in variants:
        mine = [p for p in phases if p["variant"] == variant and p["measured"]]
        clean = [p for p in mine if p["foreign_cores"] <= FOREIGN_LIMIT] or mine
        out[variant] = {
            "phases": len(clean),
            "rps": statistics.mean(p["rps"] for p in clean),
            "rps_min": min(p["rps"] for p in clean),
            "rps_max": max(p["rps"] for p in clean),
            "p50": statistics.mean(p["stats"]["p50_ms"] for p in clean),
            "p99": max(p["stats"]["p99_ms"] for p in clean),
            "errors": sum(p["stats"]["bad"] + p["stats"]["errors"] for p in mine),
            "api_cpu_ms": statistics.mean(p["cpu"]["api"] * 1000 / max(1, p["stats"]["completed"]) for p in clean),
            "all_cpu_ms": statistics.mean(p["total_cpu"] * 1000 / max(1, p["stats"]["completed"]) for p in clean),
            "own_cpu_ms": statistics.mean(sum(p["cpu"].values()) * 1000 / max(1, p["stats"]["completed"]) for p in clean),
        }
    return out


def patch_effects(server, body_files, requests, workdir):
    """CPU per request in-process with no tuned patch, each alone, and all; one process switching
    them between passes, in interleaved rounds (best of the rounds kept)."""
    out = workdir / "effects.json"
    cmd = [sys.executable, "-m", "bench.ingest_profile", "--effects", "--rounds", "3", "--requests", str(requests),
           "--app", "bench.tuned_wsgi", "--api-key", server.auth, f"--boundary={BOUNDARY}", "--json", str(out), *body_files]
    before = load1()
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=dict(server.env, TUNED_PATCHES="all"),
                            capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        print(f"patch effects failed: {result.stderr.strip()[-1500:]}")
        return
    data = json.loads(out.read_text())
    rows = data["configs"]
    base_cpu, base_wall = rows[0][1], rows[0][2]
    print(f"\nEach tuned patch alone, in-process through the WSGI app (one process switching patches between passes; "
          f"best of {data['rounds']} interleaved rounds of {data['requests']} requests; load1 {before:.2f} before, {load1():.2f} after):")
    print(f"  {'patches':21}  {'CPU ms/req':>10}  {'saved':>6}  {'wall ms/req':>11}  {'saved':>6}")
    for name, cpu, wall in rows:
        print(f"  {name:21}  {cpu:10.2f}  {base_cpu - cpu:6.2f}  {wall:11.2f}  {base_wall - wall:6.2f}")


# --- Main ------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", choices=("filesystem", "s3"), default="filesystem")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measured phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before a variant's first phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="platform,baseline,tuned")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers per variant")
    parser.add_argument("--gunicorn-args", default="", help="extra gunicorn arguments for every variant it serves, e.g. "
                        "'--worker-class gthread --threads 2' (exploration; the default is sync workers)")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--reruns", type=int, default=1, help="phases re-run at most when foreign load was high")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds the whole run may take: a noisy phase is re-run only if it still fits")
    parser.add_argument("--profile-requests", type=int, default=100)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--patch-effects", action="store_true",
                        help="also measure each tuned patch alone in-process (CPU per request; ~40 s more)")
    parser.add_argument("--keep", action="store_true", help="leave the environment up (debugging); prints how to remove it")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if split_variant(v)[0] not in ("platform", "baseline", "tuned")
               or split_variant(v)[1] not in ("gunicorn", "granian")]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)} (platform, baseline or tuned, optionally @granian)")
    if any(split_variant(v)[1] == "granian" for v in variants) and not (BIN / "granian").exists():
        parser.error("granian is not installed in this environment (make install-dev installs it)")

    install_signal_handlers()
    cleanup = Cleanup()
    started = time.monotonic()
    try:
        return _main(args, variants, cleanup, started)
    finally:
        if args.keep:
            log("--keep: environment left up")
        else:
            log("cleaning up")
            cleanup.run()
            log(f"done in {time.monotonic() - started:.0f}s")


def _main(args, variants, cleanup, started):
    tag = str(os.getpid())
    db_name = f"face_detect_bench_{tag}"
    vhosts = {variant: f"face_detect_bench_{tag}_{slug(variant)}" for variant in variants}
    broker_urls = {variant: f"amqp://guest:guest@127.0.0.1:5672/{vhost}" for variant, vhost in vhosts.items()}
    database_url = f"postgres://postgres@127.0.0.1:5432/{db_name}"
    print(f"machine: {os.cpu_count()} cores, load1 {load1():.2f} at start; storage={args.storage}, "
          f"{args.connections} connections, {args.duration:.0f}s phases, {args.rounds} rounds, {args.workers} workers per server")

    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    if args.client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk), use --client python")

    workdir = Path(tempfile.mkdtemp(prefix="face-detect-bench-"))
    cleanup.add("temp dir", lambda: shutil.rmtree(workdir, ignore_errors=True))

    images = small_jpegs()
    bodies = [multipart_body(name, data) for name, data in images]
    print("images: " + ", ".join(f"{name} {len(data) / 1024:.0f} KB" for name, data in images))
    client = (WrkClient if use_wrk else PythonClient)(workdir, bodies)

    for vhost in vhosts.values():
        cleanup.add(f"vhost {vhost}", Vhost(vhost).create().delete)

    own_pids = {"bench": {os.getpid()}}
    s3 = None
    if args.storage == "s3":
        s3 = start_s3(cleanup)
        own_pids["s3"] = {s3.proc.pid}
        for variant in variants:
            s3.make_bucket(bench_name(variant))

    base_env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    base_env.update({
        "DATABASE_URL": database_url,
        "SECRET_KEY": "bench-ingest-not-a-secret",
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "THROTTLE_RATE": THROTTLE_RATE,
        **(s3.env("unset") if s3 else {"STORAGE_BACKEND": "filesystem", "MINIO_ENDPOINT": ""}),
        "MEDIA_ROOT": str(workdir / "media-unused"),
        "PYTHONDONTWRITEBYTECODE": "1",
    })

    log(f"creating database {db_name}")
    cleanup.add("database", Database(db_name).drop)
    run([sys.executable, "manage.py", "ensure_database"], env=base_env, timeout=60)
    run([sys.executable, "manage.py", "migrate", "--no-input", "-v", "0"], env=base_env, timeout=120)
    cleanup.add("throttle keys", flush_throttle_keys)

    servers, targets, queues = {}, {}, {}
    for variant in variants:
        kind, server_kind = split_variant(variant)
        name = bench_name(variant)
        created = json.loads(run([sys.executable, "manage.py", "create_client", name], env=base_env).stdout)
        env = dict(base_env, CELERY_BROKER_URL=broker_urls[variant])
        media = workdir / f"media-{slug(variant)}"
        media.mkdir()
        env["MEDIA_ROOT"] = str(media)
        env["MINIO_BUCKET"] = name
        targets[variant] = (s3.client(), name) if s3 else media
        if kind == "baseline":
            env.update({"PLAIN_BROKER_URL": broker_urls[variant], "PLAIN_QUEUE": "plain_detect",
                        "PLAIN_CLIENT_ID": str(client_id(database_url, name))})
            app, path, auth, queues[variant] = "bench.plain_wsgi:application", "/upload/", None, "plain_detect"
        elif kind == "tuned":
            app, path, auth, queues[variant] = "bench.tuned_wsgi:application", "/api/v1/images/", created["api_key"], "tuned_detect"
        else:
            app, path, auth, queues[variant] = "face_detect_api.wsgi:application", "/api/v1/images/", created["api_key"], "detect"
        servers[variant] = Server(variant, app, env, path, auth, workdir, kind=server_kind)

    log(f"starting {len(servers)} servers")
    for server in servers.values():
        cleanup.add(f"{server.kind} {server.name}", server.stop)
        server.start(args.workers, args.gunicorn_args.split())
    for server in servers.values():
        server.wait_ready(args.workers)
    log(f"ready after {time.monotonic() - started:.0f}s; load generator: {client.name}")

    meter = CpuMeter(db_name, own_pids)
    totals = {v: {"ok": 0, "bad": 0, "in_flight": 0, "errors": 0} for v in variants}
    phases = []
    reruns_left = args.reruns

    def phase(variant, label, duration, measured):
        server = servers[variant]
        before = load1()
        meter.own_pids["idle servers"] = set().union(*(s.pids() for s in servers.values() if s is not server))
        meter.start()
        stats = client.run(server.port, server.path, server.auth, args.connections, duration)
        wall, total, groups = meter.stop(server.pids(), client.is_child)
        for key in ("ok", "bad", "in_flight", "errors"):
            totals[variant][key] += stats[key]
        cpu = {g: groups.get(g, 0.0) for g in GROUPS}
        record = {
            "label": label, "variant": variant, "load1": before, "stats": stats, "measured": measured,
            "rps": stats["completed"] / stats["duration_s"], "cpu": cpu, "total_cpu": total,
            "busy_cores": total / wall, "foreign_cores": groups.get("foreign", 0.0) / wall, "note": "",
        }
        if not measured:
            record["note"] = "warm-up"
        elif record["foreign_cores"] > FOREIGN_LIMIT:
            record["note"] = "noisy: " + ", ".join(f"{name} {sec / wall:.2f}" for name, sec in meter.foreign_top)
        phases.append(record)
        log(f"{label} {variant}: {record['rps']:.0f} req/s p99 {stats['p99_ms']:.1f} ms, 2xx {stats['ok']}, "
            f"non-2xx {stats['bad']}, load1 before {before:.2f}, foreign {record['foreign_cores']:.2f} cores")
        return record

    warmed = set()
    for round_no in range(1, args.rounds + 1):
        for variant in variants:
            if variant not in warmed and args.warmup > 0:
                phase(variant, f"w{round_no}", args.warmup, measured=False)
                warmed.add(variant)
            record = phase(variant, f"r{round_no}", args.duration, measured=True)
            remaining = (args.rounds - round_no) * len(variants) + len(variants) - variants.index(variant) - 1
            projected = time.monotonic() - started + (remaining + 1) * args.duration + (0 if args.no_profile else 20)
            if record["note"].startswith("noisy") and reruns_left > 0 and projected <= args.budget:
                reruns_left -= 1
                phase(variant, f"r{round_no}b", args.duration, measured=True)

    print()
    print(f"Per phase (load generator: {client.name}; CPU columns are milliseconds of CPU per completed request; "
          f"'kernel' = kernel threads (writeback, journal, partly ours); 'foreign' = cores used by other people's processes during the phase)")
    print_phase_table(phases, GROUPS if args.storage == "s3" else [g for g in GROUPS if g != "s3"])

    summary = summarize(phases, variants)
    print()
    print("Summary (mean over clean measured phases; p99 = worst phase; stack CPU = the server + PostgreSQL + RabbitMQ + Redis"
          " + load generator + kernel threads per request; capacity = cores / stack CPU, what the machine would serve with"
          " nothing else running)")
    base = summary.get("baseline")
    head = ["variant", "req/s", "min-max", "p50 ms", "p99 ms", "errors", "api CPU ms/req", "stack CPU ms/req",
            "2-core capacity req/s", "vs baseline"]
    rows = []
    cores = os.cpu_count() or 1
    for variant, s in summary.items():
        ratio = f"{s['rps'] / base['rps']:.2f}x" if base else "-"
        rows.append([variant, f"{s['rps']:.0f}", f"{s['rps_min']:.0f}-{s['rps_max']:.0f}", f"{s['p50']:.1f}", f"{s['p99']:.1f}",
                     s["errors"], f"{s['api_cpu_ms']:.2f}", f"{s['own_cpu_ms']:.2f}", f"{cores * 1000 / s['own_cpu_ms']:.0f}", ratio])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print(fmt_row(head, widths))
    for row in rows:
        print(fmt_row(row, widths))
    if base and len(variants) > 1:
        print("Per round (phases run back to back, so they met similar noise): req/s relative to the baseline's phase"
              " of the same round (foreign cores in brackets)")
        for round_no in range(1, args.rounds + 1):
            mine = {p["variant"]: p for p in phases if p["label"] == f"r{round_no}"}
            if "baseline" not in mine:
                continue
            b = mine["baseline"]
            cells = [f"{v} {mine[v]['rps']:.0f} ({mine[v]['foreign_cores']:.2f}) = {mine[v]['rps'] / b['rps']:.2f}x"
                     for v in variants if v in mine and v != "baseline"]
            print(f"  round {round_no}: baseline {b['rps']:.0f} ({b['foreign_cores']:.2f}); " + "; ".join(cells))
    for variant, s in summary.items():
        if split_variant(variant)[0] == "baseline":
            continue
        verdict = "meets" if s["rps"] > 300 and s["p99"] < 100 else "misses"
        print(f"{variant} {verdict} the target (> 300 req/s with p99 < 100 ms at {args.connections} connections)")

    # Let the last in-flight requests that wrk abandoned finish before counting.
    time.sleep(1.0)
    for server in servers.values():
        server.log_file.flush()
        text = server.log_path.read_text(errors="replace")
        if "Traceback" in text or " ERROR " in text or "error" in text.lower():
            print(f"\n{server.kind} {server.name} logged errors (first lines):")
            print("\n".join("    " + line for line in text.splitlines()[:25]))
    print()
    print("Verification: rows = stored objects = enqueued messages = 2xx (+ requests in flight when wrk stopped)")
    counts = db_counts(database_url)
    head = ["variant", "2xx", "in flight", "expected", "rows", "rows enqueued", "objects", "messages", "ok"]
    rows = []
    all_ok = True
    for variant in variants:
        t = totals[variant]
        expected = t["ok"] + t["in_flight"]
        row_count, enqueued = counts.get(bench_name(variant), (0, 0))
        if split_variant(variant)[0] == "baseline":
            enqueued = "n/a"
        objects = count_objects(args.storage, targets[variant])
        messages = queue_depth(broker_urls[variant], queues[variant])
        good = row_count == objects == messages == expected and (enqueued == "n/a" or enqueued == row_count)
        all_ok &= good
        rows.append([variant, t["ok"], t["in_flight"], expected, row_count, enqueued, objects, messages, "yes" if good else "NO"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print(fmt_row(head, widths))
    for row in rows:
        print(fmt_row(row, widths))
    print("verification " + ("passed" if all_ok else "FAILED"))
    sys.stdout.flush()

    if (not args.no_profile and "platform" in servers) or (args.patch_effects and "tuned" in servers):
        for server in servers.values():  # the in-process measurements want the cores to themselves
            server.stop()
        body_files = getattr(client, "body_files", None)
        if body_files is None:
            body_files = []
            for i, body in enumerate(bodies):
                path = workdir / f"body{i}.bin"
                path.write_bytes(body)
                body_files.append(str(path))
    if not args.no_profile and "platform" in servers:
        from bench.ingest_profile import report

        runs = []
        for variant, app in (("platform", "face_detect_api.wsgi"), ("tuned", "bench.tuned_wsgi")):
            if variant not in servers:
                continue
            log(f"profiling the {variant} endpoint in-process (load1 {load1():.2f})")
            out = workdir / f"profile-{variant}.json"
            cmd = [sys.executable, "-m", "bench.ingest_profile", "--requests", str(args.profile_requests), "--app", app,
                   "--api-key", servers[variant].auth, f"--boundary={BOUNDARY}", "--large", str(PHOTOS / "vlad_sample1.jpg"),
                   "--json", str(out), *body_files]
            if variant != "platform":
                cmd.insert(-len(body_files), "--no-isolated")
            result = subprocess.run(cmd, check=False, cwd=ROOT, env=servers[variant].env, capture_output=True, text=True, timeout=180)
            if result.returncode != 0:
                print(f"profile of {variant} failed:\n{result.stderr[-3000:]}")
                continue
            runs.append(json.loads(out.read_text()))
        if runs:
            print()
            report(runs)
    if args.patch_effects and "tuned" in servers:
        log("measuring each tuned patch alone")
        patch_effects(servers["tuned"], body_files, args.profile_requests, workdir)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

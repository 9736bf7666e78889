"""Shared pieces of bench.pipeline and bench.memory: the whole platform as real processes on
resources of the benchmark's own, a timed callback receiver, and CPU / RSS accounting from /proc.

A `BenchStack` is a `stack.Stack` (the module `make run`, the demo and the fault tests share):
a RabbitMQ vhost, a PostgreSQL database (migrated once, later ones cloned from it with CREATE
DATABASE ... TEMPLATE), a temporary MEDIA_ROOT or a bucket on the benchmark's SeaweedFS S3
server (`start_s3`), and every process of the Procfile as `make run` starts it, each in its own
process group; all of it stopped and removed by `Cleanup.run`, also on Ctrl-C / SIGTERM / SIGHUP.
Redis database 12 holds the rate-limit cache (THROTTLE_RATE=1000000/s: never limits; its keys
expire within a second) and the (unused) result backend.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from stack import S3Server, Stack, free_port, stop_process_group  # noqa: F401 (free_port, stop_process_group: for bench.*)

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "photos"
BIN = ROOT / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
REDIS_DB = 12
OTHER_LOAD_LIMIT = 0.25  # cores used by other people's processes during a turn before it counts as noisy


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def photo_names():
    return sorted(p.name for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def detect_engines():
    """The engines to measure: both when the settings know DETECT_ENGINE, else the default only."""
    text = (ROOT / "face_detect_api" / "settings.py").read_text()
    return ["onnx", "tensorflow"] if re.search(r"^DETECT_ENGINE\s*=", text, re.M) else ["default"]


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        with open("/proc/loadavg") as f:
            return "load average " + " ".join(f.read().split()[:3])


def percentile(values, p):
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def table(header, rows):
    """Rows of strings as an aligned plain-text table."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


# --- Cleanup ------------------------------------------------------------------------------------


class Cleanup:
    """Undo steps, run in reverse order; each failure is logged and the rest still run."""

    def __init__(self):
        self._steps = []

    def add(self, name, func):
        self._steps.append((name, func))

    def run(self):
        # A second Ctrl-C during cleanup must not leave things behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self._steps:
                name, func = self._steps.pop()
                try:
                    func()
                except BaseException as error:  # keep cleaning up the rest
                    log(f"cleanup of {name} failed: {error!r}")
        finally:
            signal.signal(signal.SIGINT, previous)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def install_signal_handlers():
    """Ctrl-C (even when started in the background, where SIGINT is ignored by default), SIGTERM and
    SIGHUP unwind the stack, so `finally` cleans up."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)


class PipeWorker:
    """A subprocess spoken to in JSON lines over its stdin and stdout; its stderr is kept to say
    why, should it exit."""

    def __init__(self, name, argv, env, **popen):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, **popen)

    def send(self, request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"{self.name} exited with {self.proc.wait()}:\n{self.log.read()[-3000:]}")
        return json.loads(line)


def run_clients(client, count, deadline, errors):
    """`count` threads running `client` until it returns, each join bounded by `deadline`
    (perf_counter); re-raises the first error the clients put in `errors`."""
    threads = [threading.Thread(target=client, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()) + 5)
    if errors:
        raise errors[0]


# --- The stack: the shared `stack` module, with the benchmark's environment -----------------------


def start_s3(cleanup):
    """One SeaweedFS S3 server (stack.S3Server) in a temporary directory, stopped by `cleanup`;
    the stacks each put a bucket of their own on it."""
    directory = Path(tempfile.mkdtemp(prefix="face-detect-bench-s3-"))
    cleanup.add("S3 server's directory", lambda: shutil.rmtree(directory, ignore_errors=True))
    server = S3Server(directory)
    cleanup.add("S3 server", server.stop)
    log(f"starting the S3 server (SeaweedFS) on {server.endpoint}")
    return server.start()


# Platform defaults for everything the test environment (tests/testenv.py) would override.
BENCH_ENV = {
    "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:6379/{REDIS_DB}",
    "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
    "CALLBACK_ALLOWED_NETWORKS": "127.0.0.1/32",
    "THROTTLE_RATE": "1000000/s",
    "CALLBACK_RETRY_DELAYS": "5,30,120,600,1800,3600,10800,21600",
    "CALLBACK_TIMEOUT": "10",
    "CALLBACK_DISPATCH_INTERVAL": "1",
    "DEBUG": "false",
    "LOG_LEVEL": "INFO",
    "SECRET_KEY": "bench-not-a-secret-0123456789abcdefghijklmnopqrstuvwxyz",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


class BenchStack:
    """One platform instance (stack.Stack: every Procfile process, on a database, vhost and
    bucket or media root of its own), removed again by `cleanup`. `s3`: the S3 server to keep
    images on (stack.S3Server), else a temporary directory."""

    def __init__(self, name, tag, cleanup, env=None, template_db=None, api_workers=4, concurrency=2, s3=None,
                 fields=None):
        self.name = name
        self.fields = fields or {}  # sent with every upload, e.g. {"engine": "blazeface"}
        self.concurrency = concurrency
        self.api_workers = api_workers
        self.stack = Stack(f"bench-{tag}-{name}", {**BENCH_ENV, **(env or {})}, s3=s3,
                           storage="s3" if s3 else "filesystem", template=template_db)
        cleanup.add(f"stack {name}", self.stack.close)
        self.db_name = self.stack.database.name
        self.credentials = None

    @property
    def base_url(self):
        return self.stack.base_url

    def start(self):
        """Every Procfile process, each waited for (a detect worker: every pool child's "detector ready")."""
        self.stack.start_all(GUNICORN_WORKERS=str(self.api_workers), WORKER_CONCURRENCY=str(self.concurrency))
        self.credentials = self.stack.create_client()
        return self

    def stop(self):
        self.stack.stop()

    def log(self, process):
        """The log of a Procfile entry; "detect" stands for every detect worker's."""
        return self.stack.detect_log() if process == "detect" else self.stack.log(process)

    def processes(self, tree=None):
        """{kind: [pid, ...]} of the running processes: gunicorn master / workers, detect parent /
        pool children (every detect worker of the Procfile), and the others by Procfile name."""
        tree = tree if tree is not None else children_map()
        kinds = {}
        for name, proc in self.stack.procs.items():
            if proc.poll() is not None:
                continue
            pid = proc.pid
            kids = tree.get(pid, [])
            if name == "api":
                kinds["gunicorn master"] = [pid]
                kinds["gunicorn workers"] = kids
            elif self.stack.is_detect_worker(name):
                kinds.setdefault("detect parent", []).append(pid)
                kinds.setdefault("detect children", []).extend(kids)
            else:
                kinds[name] = [pid] + descendants(pid, tree)
        return kinds

    def all_pids(self, tree=None):
        tree = tree if tree is not None else children_map()
        pids = set()
        for proc in self.stack.procs.values():
            if proc.poll() is None:
                pids |= {proc.pid, *descendants(proc.pid, tree)}
        return pids


# --- Callbacks -----------------------------------------------------------------------------------


class _TimedList(list):
    """tests.receiver.Receiver appends every request here under its lock: stamp its arrival."""

    def __init__(self, on_append):
        super().__init__()
        self._on_append = on_append

    def append(self, item):
        item["received_at"] = time.perf_counter()
        super().append(item)
        self._on_append(item)


class TimedReceiver:
    """tests.receiver.Receiver (a real HTTP server) with the arrival time of each callback, and a
    condition to wait on."""

    def __init__(self):
        from tests.receiver import Receiver

        self.receiver = Receiver()
        self.cond = threading.Condition()
        self.receiver.requests = _TimedList(self._arrived)
        self.arrivals = {}  # path -> (first arrival time, event type)

    def _arrived(self, item):
        try:
            kind = json.loads(item["body"]).get("type")
        except ValueError:
            kind = None
        with self.cond:
            self.arrivals.setdefault(item["path"], (item["received_at"], kind))
            self.cond.notify_all()

    def url(self, path):
        return self.receiver.url(path)

    def wait(self, paths, deadline):
        """Wait until every path got a callback or perf_counter() reaches deadline; returns the missing."""
        with self.cond:
            while True:
                missing = [p for p in paths if p not in self.arrivals]
                if not missing or time.perf_counter() >= deadline:
                    return missing
                self.cond.wait(min(1.0, max(0.01, deadline - time.perf_counter())))

    def close(self):
        self.receiver.close()


def submit(session, stack, name, data, request_id, callback_url):
    """POST one upload; returns the image id. Raises on anything but 202."""
    response = session.post(
        f"{stack.base_url}/api/v1/images/",
        headers={"Authorization": f"Bearer {stack.credentials['api_key']}"},
        files={"image": (name, data)},
        data={"request_id": request_id, "callback_url": callback_url, **getattr(stack, "fields", {})},
        timeout=60,
    )
    if response.status_code != 202:
        raise RuntimeError(f"upload {request_id}: {response.status_code} {response.text[:300]}")
    return response.json()["id"]


# --- /proc -------------------------------------------------------------------------------------


def read_stat(pid):
    """(comm, ppid, own ticks, reaped children's ticks) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    close = data.rfind(b")")
    comm = data[data.find(b"(") + 1:close].decode(errors="replace")
    fields = data[close + 2:].split()
    return comm, int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def all_pids():
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def children_map():
    tree = {}
    for pid in all_pids():
        stat = read_stat(pid)
        if stat:
            tree.setdefault(stat[1], []).append(pid)
    return tree


def descendants(pid, tree):
    out, todo = [], list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo += tree.get(child, [])
    return out


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine_busy_ticks():
    """CPU ticks the whole machine spent since boot (all cores; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def listener_pid(port, comms):
    """The pid (of a process named in comms) holding the listening TCP socket on this port."""
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            pass
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() not in comms:
                    continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
        except OSError:
            continue
    return None


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class CpuMeter:
    """CPU seconds by group between start() and stop().

    Groups: the caller's own labelled pid sets (each with its descendants), "bench" (this process
    and any other descendant of it not labelled), "pg" (PostgreSQL backends serving the
    benchmark's databases), "services" (the shared local RabbitMQ, Redis and PostgreSQL's own
    background processes: other people's work on them lands here too), and "other" = the machine's
    busy CPU time (/proc/stat) minus all of the above: the load of processes that are not the
    benchmark's. A process's CPU includes that of its children it reaped during the interval
    (recycled pool children, exited gunicorn workers), so a recycled child is not lost.
    """

    def __init__(self, db_groups):
        # {database name: group} for the backends serving the benchmark's databases (a list: "pg")
        self.db_groups = dict(db_groups) if isinstance(db_groups, dict) else {name: "pg" for name in db_groups}
        cls = type(self)
        if cls._servers is None:  # the shared servers' main processes, found once
            cls._servers = (listener_pid(5432, {"postgres"}), listener_pid(5672, {"beam.smp"}),
                            listener_pid(6379, {"redis-server"}))
        self.pg_main, self.rabbit_main, self.redis_main = cls._servers
        self.me = os.getpid()

    _pg_conn = None
    _servers = None

    @classmethod
    def _sessions(cls):
        """{database: sessions ever opened} from pg_stat_database (one connection, kept open)."""
        try:
            if cls._pg_conn is None or cls._pg_conn.closed:
                import psycopg

                cls._pg_conn = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres",
                                               autocommit=True, connect_timeout=5)
            return dict(cls._pg_conn.execute("select coalesce(datname, ''), sessions from pg_stat_database").fetchall())
        except Exception:
            return {}

    @classmethod
    def close_connection(cls):
        if cls._pg_conn is not None:
            cls._pg_conn.close()
            cls._pg_conn = None

    def _snapshot(self):
        snap = {}
        for pid in all_pids():
            stat = read_stat(pid)
            if stat:
                snap[pid] = stat
        return snap

    def start(self):
        self.t0 = time.perf_counter()
        self.sessions0 = self._sessions()
        self.busy0 = machine_busy_ticks()
        self.snap0 = self._snapshot()
        return self

    def stop(self, labelled):
        """labelled: {group: set of pids (their descendants are included)} -> (wall, {group: seconds})."""
        snap1 = self._snapshot()
        busy1 = machine_busy_ticks()
        wall = time.perf_counter() - self.t0
        sessions1 = self._sessions()
        tree = {}
        for pid, (_, ppid, _, _) in snap1.items():
            tree.setdefault(ppid, []).append(pid)
        owner = {}
        for group, pids in labelled.items():
            for pid in pids:
                for p in [pid, *descendants(pid, tree)]:
                    owner.setdefault(p, group)
        for p in [self.me, *descendants(self.me, tree)]:
            owner.setdefault(p, "bench")
        rabbit_family = set()
        if self.rabbit_main:
            rabbit_family = {self.rabbit_main, *descendants(self.rabbit_main, tree)}
        groups, foreign = {}, []
        for pid, (comm, ppid, ticks, cticks) in snap1.items():
            before = self.snap0.get(pid)
            if before and before[0] == comm:
                delta = (ticks + cticks) - (before[2] + before[3])
            else:
                delta = ticks + cticks
            group = owner.get(pid)
            if group is None and comm == "postgres" and self.pg_main in (pid, ppid):
                words = _cmdline(pid).split()
                group = next((g for name, g in self.db_groups.items() if name in words), None)
                if pid == self.pg_main:
                    group = "services"
                    # Its reaped children are client backends that came and went (a connection per
                    # task: Celery's Django fixup closes them after every task). Share their CPU by
                    # the sessions each database opened meanwhile (pg_stat_database.sessions).
                    delta = ticks - (before[2] if before and before[0] == comm else 0)
                    reaped = cticks - (before[3] if before and before[0] == comm else 0)
                    opened = {db: n - self.sessions0.get(db, 0) for db, n in sessions1.items()}
                    total_opened = sum(max(0, n) for n in opened.values())
                    for db, g in self.db_groups.items():
                        if total_opened and opened.get(db, 0) > 0:
                            share = reaped * opened[db] / total_opened / CLK_TCK
                            groups[g] = groups.get(g, 0.0) + share
                            groups[f"{g} sessions"] = groups.get(f"{g} sessions", 0) + opened[db]
                elif group is None and not any(w.startswith("127.") or w.startswith("[local]") for w in words):
                    group = "services"  # checkpointer, walwriter, autovacuum, ... (not a client backend)
            elif group is None and (pid in rabbit_family or comm == "epmd" or pid == self.redis_main):
                group = "services"
            if group is not None:
                groups[group] = groups.get(group, 0.0) + delta / CLK_TCK
            elif delta > 0:
                foreign.append((delta / CLK_TCK, pid, comm, ppid))
        total = (busy1 - self.busy0) / CLK_TCK
        sessions = {k: groups.pop(k) for k in list(groups) if k.endswith(" sessions")}
        if os.environ.get("BENCH_DEBUG_OTHER"):
            foreign.sort(reverse=True)
            log(f"foreign processes {sum(f[0] for f in foreign):.2f} s of machine {total:.2f} s, "
                f"attributed {sum(groups.values()):.2f} s: {foreign[:8]}; postmaster reaped "
                f"{(snap1[self.pg_main][3] - self.snap0[self.pg_main][3]) / CLK_TCK:.2f} s")
        groups["other"] = max(0.0, total - sum(groups.values()))
        groups["machine"] = total
        groups.update(sessions)  # new PostgreSQL sessions of the benchmark's databases (counts, not seconds)
        return wall, groups


class RssSampler(threading.Thread):
    """Every `interval` seconds: VmRSS of every process of `stack`, by kind, plus a progress value."""

    def __init__(self, stack, progress, interval=1.0):
        super().__init__(daemon=True)
        self.stack, self.progress, self.interval = stack, progress, interval
        self.samples = []  # (t, progress, {kind: {pid: rss_mb}})
        self._stop_event = threading.Event()

    def sample(self):
        kinds = self.stack.processes()
        row = {}
        for kind, pids in kinds.items():
            row[kind] = {pid: rss for pid in pids if (rss := rss_mb(pid)) is not None}
        self.samples.append((time.perf_counter(), self.progress(), row))

    def run(self):
        while not self._stop_event.is_set():
            try:
                self.sample()
            except Exception as error:  # a process vanished mid-read: try again next second
                log(f"rss sample failed: {error!r}")
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=10)


def wait_quiet(labelled, db_groups, limit=OTHER_LOAD_LIMIT, max_wait=30.0, window=1.0):
    """Wait (at most max_wait seconds) until other people's processes use at most `limit` cores over
    a `window`-second sample; returns the last sample's other load."""
    deadline = time.perf_counter() + max_wait
    warned = False
    while True:
        meter = CpuMeter(db_groups).start()
        time.sleep(window)
        wall, groups = meter.stop(labelled())
        other = groups["other"] / wall
        if other <= limit or time.perf_counter() >= deadline:
            return other
        if not warned:
            log(f"other load {other:.2f} cores: waiting up to {max_wait:.0f} s for it to drop")
            warned = True


def run_benchmark(run, args):
    """Run `run(args, cleanup, began, up_before)` with signal handling, and clean up after it
    whatever happens (the shared entry point of bench.pipeline and bench.memory)."""
    install_signal_handlers()
    cleanup = Cleanup()
    cleanup.add("pg stats connection", CpuMeter.close_connection)
    began = time.perf_counter()
    up_before = uptime()
    try:
        return run(args, cleanup, began, up_before)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        log("cleaning up")
        cleanup.run()
        log(f"done in {time.perf_counter() - began:.0f} s")

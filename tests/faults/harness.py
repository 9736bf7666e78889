"""The fault rig: a whole stack (gunicorn, workers, beat) as real processes on a database of its
own, private servers that a test may stop, and the checks every fault test ends with."""

import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import minio
import psycopg
import requests

from tests.conftest import PHOTOS, ROOT, wait_for
from tests.testenv import TEST_ENV, free_port

BIN = ROOT / ".venv" / "bin"
PHOTO_NAMES = sorted(p.name for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".png"))


class Stack:
    """The platform's processes, started and killed one by one, all sharing one environment."""

    def __init__(self, name, env):
        self.name = name
        self.logdir = Path(tempfile.mkdtemp(prefix=f"fault-{name}-"))
        self.port = free_port()
        self.env = {**os.environ, **TEST_ENV, **env, "PORT": str(self.port), "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.port}"}
        self.procs = {}
        self.base_url = f"http://127.0.0.1:{self.port}"

    # --- processes ---

    def _spawn(self, name, argv):
        log = open(self.logdir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self.procs[name]

    def log(self, name):
        path = self.logdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def manage(self, *args, timeout=120):
        result = subprocess.run([str(BIN / "python"), "manage.py", *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    def procfile(self, process, **env):
        """The Procfile's command line for `process`, as `make run` and docker compose run it
        (tests/test_deploy_files.py holds them equal), with its variables filled in."""
        lines = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
        values = {**self.env, **env}
        return [re.sub(r"\$(\w+)", lambda m: values[m.group(1)], word) for word in shlex.split(lines[process])]

    def start_api(self):
        self._spawn("api", self.procfile("api", GUNICORN_WORKERS="2"))
        wait_for(self._api_answers, timeout=60, message="the API")

    def _api_answers(self):
        try:
            return requests.get(f"{self.base_url}/api/v1/health/", timeout=2).status_code in (200, 503)
        except requests.RequestException:
            return False

    def start_detect(self, name="detect", concurrency=2):
        marker_count = self.log(name).count("detector ready")
        argv = self.procfile("worker", WORKER_CONCURRENCY=str(concurrency))
        argv[argv.index("detect@%h")] = f"{name}@%h"  # one node name per worker, as on separate machines
        self._spawn(name, argv)
        self._wait_log(name, "detector ready", marker_count + concurrency)

    def start_callbacks(self):
        self._spawn("callbacks", self.procfile("callbacks"))
        self._wait_log("callbacks", " ready.", 1)

    def start_beat(self):
        argv = self.procfile("beat")
        argv[argv.index("run/celerybeat-schedule")] = str(self.logdir / "beat-schedule")
        self._spawn("beat", argv)

    def start_all(self):
        self.start_api()
        self.start_detect()
        self.start_callbacks()
        self.start_beat()

    def _wait_log(self, name, marker, count, timeout=120):
        def ready():
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited:\n{self.log(name)[-3000:]}")
            return self.log(name).count(marker) >= count

        wait_for(ready, timeout=timeout, message=f"{name} to be ready")

    def pool_children(self, name):
        """PIDs of a prefork worker's pool processes."""
        pid = self.procs[name].pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(child) for child in children]

    def kill(self, name, sig=signal.SIGKILL, wait=30):
        proc = self.procs[name]
        os.killpg(proc.pid, sig)
        proc.wait(wait)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            proc.wait(10)

    def purge_queues(self):
        """Drop messages another test left on the shared vhost."""
        from kombu import Connection

        with Connection(self.env["CELERY_BROKER_URL"], connect_timeout=5) as conn:
            channel = conn.channel()
            for queue in ("detect", "callbacks"):
                try:
                    channel.queue_purge(queue)
                except Exception:  # not declared yet
                    channel = conn.channel()

    # --- API ---

    def create_client(self):
        import json

        return json.loads(self.manage("create_client", f"fault-{self.name}-{time.monotonic_ns()}"))

    def submit_batch(self, credentials, receiver, count=20, prefix="img"):
        """Upload `count` real photos with callbacks; returns {image_id: request_id}."""
        headers = {"Authorization": f"Bearer {credentials['api_key']}"}
        accepted = {}
        names = itertools.cycle(PHOTO_NAMES)
        for index in range(count):
            name = next(names)
            request_id = f"{prefix}-{index}"
            with open(PHOTOS / name, "rb") as f:
                response = requests.post(
                    f"{self.base_url}/api/v1/images/", headers=headers, timeout=30,
                    files={"image": (name, f)},
                    data={"request_id": request_id, "callback_url": receiver.url(f"/{request_id}")},
                )
            assert response.status_code == 202, response.text
            accepted[response.json()["id"]] = request_id
        return accepted


class Database:
    """A database of the stack's own on some PostgreSQL server, migrated, dropped afterwards."""

    def __init__(self, name, port=5432, host="127.0.0.1"):
        self.name, self.port, self.host = name, port, host
        self.url = f"postgres://postgres@{host}:{port}/{name}"

    def create(self, stack):
        self.drop()
        stack.manage("ensure_database")
        stack.manage("migrate", "--no-input", "-v", "0")

    def drop(self):
        with psycopg.connect(host=self.host, port=self.port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def query(self, sql, params=()):
        with psycopg.connect(host=self.host, port=self.port, user="postgres", dbname=self.name, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()


class TcpProxy:
    """A TCP relay in front of a server; `cut()` refuses and drops every connection, as a dead
    server would, and `restore()` brings it back on the same port."""

    def __init__(self, target_port, port=None):
        self.target_port = target_port
        self.port = port or free_port()
        self._conns = []
        self._listener = None
        self._lock = threading.Lock()
        self._open = False
        self.restore()

    def restore(self):
        with self._lock:
            self._open = True
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self._open:  # accepted just as the proxy was cut: drop it too
                    client.close()
                    upstream.close()
                    continue
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        with self._lock:
            self._open = False
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns = []


class PrivateRabbit:
    """A RabbitMQ node of the test's own, on its own ports and data directory."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="fault-rabbit-"))
        self.dir.chmod(0o777)  # the server drops to the rabbitmq user
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"fault{self.port}@localhost"
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (self.dir / "rabbitmq-env.conf").write_text(f"NODENAME={self.node}\n")
        for f in self.dir.iterdir():
            f.chmod(0o644)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.env = {
            **os.environ, "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"), "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
        }
        self.proc = None

    def start(self):
        log = open(self.dir / "server.out", "ab")
        self.proc = subprocess.Popen(["rabbitmq-server"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(lambda: _listening(self.port), timeout=90, interval=0.5, message="the private RabbitMQ")

    def stop(self):
        subprocess.run(["rabbitmqctl", "-n", self.node, "stop"], env=self.env, capture_output=True, timeout=60)
        if self.proc:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        wait_for(lambda: not _listening(self.port), timeout=30, message="RabbitMQ to stop")

    def cleanup(self):
        if self.proc and self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: _listening(self.port), timeout=30, message="the private Redis")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb + pg_ctl), trust auth on its own port."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="fault-pg-"))
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self.bindir = Path(sorted(Path("/usr/lib/postgresql").iterdir())[-1]) / "bin"

    def _as_postgres(self, *argv, timeout=60):
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=timeout)

    def init(self):
        result = self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")
        assert result.returncode == 0, result.stderr

    def start(self):
        result = self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                                   "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "-w", "start")
        assert result.returncode == 0, result.stderr + (self.dir / "log").read_text(errors="replace")

    def stop(self, mode="fast"):
        self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def cleanup(self):
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _listening(port):
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def bucket_objects(endpoint, bucket):
    client = minio.Minio(endpoint, "x", "y", secure=False)
    return {obj.object_name for obj in client.list_objects(bucket, recursive=True)}


def assert_nothing_lost(db, accepted, receiver, storage_endpoint, bucket, timeout=180):
    """Every accepted image ended done or failed with a reason, exactly one callback event each,
    no duplicate faces, no orphaned objects. Returns a summary for RELIABILITY.md."""
    ids = list(accepted)

    def all_finished():
        rows = db.query("select count(*) from api_image where id = any(%s) and status in ('done', 'failed')", (ids,))
        return rows[0][0] == len(ids)

    try:
        wait_for(all_finished, timeout=timeout, interval=0.5, message="every image to finish")
    except AssertionError:
        stuck = db.query("select id, status, attempts, enqueued_at from api_image where id = any(%s) "
                         "and status not in ('done', 'failed')", (ids,))
        raise AssertionError(f"{len(stuck)} images never finished: {stuck[:5]}") from None

    rows = db.query("select id::text, status, error_code, face_count, original_key, annotated_key from api_image "
                    "where id = any(%s)", (ids,))
    assert len(rows) == len(ids)
    for image_id, status, error_code, _faces, _original, _annotated in rows:
        assert status == "done" or error_code, (image_id, status)

    def callbacks_settled():
        pending = db.query("select count(*) from api_image where id = any(%s) and callback_status = 'pending'", (ids,))
        return pending[0][0] == 0

    wait_for(callbacks_settled, timeout=120, interval=0.5, message="every callback to be delivered")
    for image_id, request_id in accepted.items():
        event_ids = {r["headers"]["webhook-id"] for r in receiver.received(f"/{request_id}")}
        assert len(event_ids) == 1, (image_id, request_id, event_ids)

    mismatched = db.query(
        "select i.id, i.face_count, count(f.id) from api_image i left join api_face f on f.image_id = i.id "
        "where i.id = any(%s) and i.status = 'done' group by i.id having i.face_count <> count(f.id)", (ids,))
    assert mismatched == []

    expected_objects = {key for row in rows for key in row[4:6] if key}
    assert bucket_objects(storage_endpoint, bucket) == expected_objects

    done = sum(1 for row in rows if row[1] == "done")
    deliveries = len(receiver.received())
    return {"accepted": len(ids), "done": done, "failed": len(ids) - done, "lost": 0, "callback_requests": deliveries}

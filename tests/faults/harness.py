"""The fault rig: a whole stack (the shared `stack` module: the Procfile's processes on a
database and bucket of their own), private servers that a test may stop, and the checks every
fault test ends with."""

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import requests

import stack
from stack import Database  # noqa: F401 (the fault suite's fixtures take it from here)
from tests.conftest import PHOTOS, wait_for
from tests.testenv import free_port

PHOTO_NAMES = sorted(p.name for p in PHOTOS.iterdir() if p.suffix in (".jpg", ".png"))


class Stack(stack.Stack):
    """The platform's processes (stack.Stack: the Procfile, a database and bucket of their own),
    started and killed one by one by the fault tests."""

    stop_grace = 0  # a fault test's processes are killed at the end, not drained

    def start_api(self):
        self.start("api", GUNICORN_WORKERS="2", timeout=60)

    def start_detect(self, name="worker", concurrency=2):
        """The Procfile's detect worker; another `name` is another node, as on another machine."""
        self.start("worker", name=name, WORKER_CONCURRENCY=str(concurrency), timeout=120)

    def start_callbacks(self):
        self.start("callbacks", timeout=120)

    def start_beat(self):
        self.start("beat")

    def purge_queues(self):
        """Drop messages another test left on the shared vhost."""
        from kombu import Connection

        with Connection(self.env["CELERY_BROKER_URL"], connect_timeout=5) as conn:
            channel = conn.channel()
            for queue in self.queues():
                try:
                    channel.queue_purge(queue)
                except Exception:  # not declared yet
                    channel = conn.channel()

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


def assert_nothing_lost(db, accepted, receiver, s3, bucket, timeout=180):
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
    assert s3.objects(bucket) == expected_objects

    done = sum(1 for row in rows if row[1] == "done")
    deliveries = len(receiver.received())
    return {"accepted": len(ids), "done": done, "failed": len(ids) - done, "lost": 0, "callback_requests": deliveries}

"""Real worker processes for end-to-end tests: a prefork worker for each engine's queue running
the real detector, a threaded `callbacks` worker, and beat, all against the test database, the session's
RabbitMQ vhost and the S3 server. Started once for this package, stopped after it."""

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

CELERY = str(ROOT / ".venv" / "bin" / "celery")


class Processes:
    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.procs = {}

    def start(self, name, args, env):
        log = open(self.logdir / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            [CELERY, "-A", "face_detect_api", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self, name):
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def wait_ready(self, name, marker, count=1, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log(name).count(marker) >= count:
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError(f"{name} not ready:\n{self.log(name)[-3000:]}")

    def stop(self, timeout=30):
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def worker_env():
    from django.db import connection

    db = connection.settings_dict
    return dict(os.environ, DATABASE_URL=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}")


@pytest.fixture(scope="package")
def workers(django_db_setup, django_db_blocker, rabbit_vhost, s3_server):
    from face_detect_api.celery import app

    app.control.purge()
    procs = Processes(tempfile.mkdtemp(prefix="face-detect-workers-"))
    env = worker_env()
    common = ["--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    procs.start("detect", ["worker", "-Q", "detect", "-n", "e2e-detect@%h", "-c", "2", "-O", "fair", *common], env)
    procs.start("detect-blazeface", ["worker", "-Q", "detect-blazeface", "-n", "e2e-detect-blazeface@%h", "-c", "1",
                                     "-O", "fair", *common], env)
    procs.start("callbacks", ["worker", "-Q", "callbacks", "-n", "e2e-callbacks@%h", "-P", "threads", "-c", "4", *common], env)
    procs.start("beat", ["beat", "-s", str(procs.logdir / "schedule"), "--loglevel", "INFO"], env)
    try:
        procs.wait_ready("callbacks", " ready.")
        procs.wait_ready("detect", "detector ready", count=2)
        procs.wait_ready("detect-blazeface", "detector ready")
        yield procs
    finally:
        procs.stop()

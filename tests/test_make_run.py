"""`make run`'s launcher (python -m stack.run) as a newcomer meets it: with no MINIO_ENDPOINT it
starts a SeaweedFS S3 server of its own, uploads are stored there, and SIGTERM or a Ctrl-C stops
every process it started, `weed` included."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import minio
import pytest
import requests

from stack import Vhost
from tests.conftest import PHOTOS, ROOT, wait_for
from tests.testenv import SESSION, free_port


def launcher_env(tmp_path, port, s3_port, broker_url):
    from django.db import connection

    db = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "STORAGE_"))}
    return {
        **env,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}",
        "CELERY_BROKER_URL": broker_url,
        "PORT": str(port), "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "LOCAL_S3_PORT": str(s3_port), "LOCAL_S3_DIR": str(tmp_path / "s3"),
        "GUNICORN_WORKERS": "1", "WORKER_CONCURRENCY": "1",
    }


def descendants(pid):
    """Every process below `pid`, however deep (honcho's processes, their pools, weed)."""
    found, pending = [], [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop()}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


def alive(pids):
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]


def _state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


@pytest.fixture
def vhost():
    created = Vhost(f"face_detect_test_{SESSION}_make_run").create()
    yield created
    created.delete()


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_make_run_stores_uploads_on_its_own_s3_server_and_stops_everything(stop, tmp_path, transactional_db, vhost):
    from api.models import Client

    _client, key = Client.create_with_credentials(f"make-run-{stop}")
    port, s3_port = free_port(), free_port()
    env = launcher_env(tmp_path, port, s3_port, vhost.url)
    output = open(tmp_path / "make-run.log", "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "stack.run"], cwd=ROOT, env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)
    started = []
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return requests.get(f"{base}/api/v1/health/", timeout=3).status_code == 200
            except requests.RequestException:
                return False

        wait_for(healthy, timeout=180, interval=0.5, message="the API, with its storage")
        with open(PHOTOS / "clm_audrey.jpg", "rb") as photo:
            response = requests.post(f"{base}/api/v1/images/", files={"image": photo}, timeout=30,
                                     headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 202, response.text
        image_id = response.json()["id"]
        status = lambda: requests.get(f"{base}/api/v1/images/{image_id}/", timeout=10,  # noqa: E731
                                      headers={"Authorization": f"Bearer {key}"}).json()["status"]
        wait_for(lambda: status() == "done", timeout=180, interval=0.5, message="the image to be done")

        # The objects are on the S3 server it started, which checks the keys of its identities file.
        identity = json.loads((tmp_path / "s3" / "identities.json").read_text())["identities"][0]["credentials"][0]
        s3 = minio.Minio(f"127.0.0.1:{s3_port}", identity["accessKey"], identity["secretKey"], secure=False)
        stored = {obj.object_name for obj in s3.list_objects("face-detect", recursive=True)}
        assert {f"originals/{image_id}.jpg", f"annotated/{image_id}.jpg"} <= stored

        started = descendants(launcher.pid)
        assert any("weed" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace") for pid in alive(started))
        if stop == "sigterm":
            launcher.send_signal(signal.SIGTERM)
        else:  # what a terminal does on Ctrl-C: SIGINT to the whole foreground process group
            os.killpg(launcher.pid, signal.SIGINT)
        assert launcher.wait(timeout=60) == 0
        wait_for(lambda: not alive(started), timeout=30, message="every process it started to exit")
    finally:  # after a failure: nothing of it may outlive the test
        leftovers = started or descendants(launcher.pid)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
        for pid in alive(leftovers):
            os.kill(pid, signal.SIGKILL)
        output.close()

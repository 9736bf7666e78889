"""The Python client (`facedetect.Client`) and the `facedetect` command against a running stack:
gunicorn, Celery workers and beat as real processes, the real detector on real photos."""

import json
import os
import subprocess
import sys
import time

import PIL.Image
import pytest
import requests
from facedetect import ApiError, Client

from tests.conftest import PHOTOS, ROOT
from tests.testenv import free_port

pytestmark = pytest.mark.e2e

PORTRAIT = "clm_cage.jpg"  # one frontal face on a small photo: quick to detect
GROUP = "vlad_sample1.jpg"  # three faces


@pytest.fixture
def stack(make_stack):
    """The whole platform: API, detect and callbacks workers, beat."""
    stack, _database = make_stack()
    stack.start_all()
    return stack


@pytest.fixture
def api_only(make_stack):
    """The API alone: enough for errors and for anything that needs no worker."""
    stack, _database = make_stack()
    stack.start_api()
    return stack


def client_of(stack):
    credentials = stack.create_client()
    return Client(stack.base_url, credentials["api_key"]), credentials


def decoded(path):
    with PIL.Image.open(path) as image:
        image.load()
        return image.format, image.size


# --- the library ---

def test_it_submits_a_photo_and_waits_until_its_faces_are_found(stack):
    client, _ = client_of(stack)

    image = client.submit(PHOTOS / PORTRAIT, request_id="portrait", min_confidence=0.9, annotation="boxes")
    assert image["status"] == "queued" and image["request_id"] == "portrait"

    done = client.wait(image["id"], timeout=180)
    assert done["status"] == "done", done["error"]
    assert done["face_count"] == len(done["faces"]) == 1
    assert client.get(image["id"])["faces"] == done["faces"]
    # The same bytes under the same request_id are the same image, not a new job.
    assert client.submit((PHOTOS / PORTRAIT).read_bytes(), request_id="portrait")["id"] == image["id"]


def test_it_lists_the_clients_images_filtered_by_status_and_request_id(stack):
    client, _ = client_of(stack)
    first = client.submit(PHOTOS / PORTRAIT, request_id="first")
    client.wait(first["id"], timeout=180)
    second = client.submit(PHOTOS / GROUP, request_id="second")

    everything = client.list(page=1)
    assert everything["count"] == 2
    assert [image["id"] for image in everything["results"]] == [second["id"], first["id"]]  # newest first
    assert [image["id"] for image in client.list(request_id="first")["results"]] == [first["id"]]
    assert first["id"] in [image["id"] for image in client.list(status="done")["results"]]
    assert [image["id"] for image in client.iter_images()] == [second["id"], first["id"]]
    client.wait(second["id"], timeout=180)  # leave no job running into the stack's shutdown


def test_it_downloads_the_annotated_image_at_the_size_of_the_photo(stack, tmp_path):
    client, _ = client_of(stack)
    image = client.wait(client.submit(PHOTOS / GROUP, annotation="blur")["id"], timeout=180)
    assert image["status"] == "done", image["error"]

    annotated = client.download(image["id"], tmp_path / "annotated.jpg")
    assert decoded(annotated) == ("JPEG", (image["width"], image["height"]))
    assert decoded(PHOTOS / GROUP)[1] == (image["width"], image["height"])
    original = client.download(image["id"], tmp_path / "original.jpg", which="original")
    assert original.read_bytes() == (PHOTOS / GROUP).read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial files left


def test_it_follows_a_redirect_to_a_presigned_storage_url(make_stack, tmp_path):
    stack, _database = make_stack(DOWNLOAD_REDIRECT="true")
    stack.start_api()
    client, credentials = client_of(stack)
    image = client.submit(PHOTOS / PORTRAIT)

    raw = requests.get(image["original_url"], headers={"Authorization": f"Bearer {credentials['api_key']}"},
                       allow_redirects=False, timeout=30)
    assert raw.status_code == 302  # so the download below really takes the redirect
    saved = client.download(image["id"], tmp_path / "original.jpg", which="original")
    assert saved.read_bytes() == (PHOTOS / PORTRAIT).read_bytes()


def test_a_bad_api_key_raises_not_authenticated(api_only):
    with pytest.raises(ApiError) as raised:
        Client(api_only.base_url, "fd_not-a-real-key").list()
    assert (raised.value.status, raised.value.code) == (401, "not_authenticated")
    assert raised.value.message


def test_bytes_that_are_no_image_raise_invalid_image(api_only):
    client, _ = client_of(api_only)
    with pytest.raises(ApiError) as raised:
        client.submit(b"%PDF-1.4 this is not a photo", request_id="not-a-photo")
    assert (raised.value.status, raised.value.code) == (400, "invalid_image")
    assert client.list()["count"] == 0


def test_a_malformed_field_raises_invalid_request_naming_it(api_only):
    client, _ = client_of(api_only)
    with pytest.raises(ApiError) as raised:
        client.submit(PHOTOS / PORTRAIT, min_confidence=7)
    assert (raised.value.status, raised.value.code) == (400, "invalid_request")
    assert "min_confidence" in json.dumps(raised.value.details)


def test_an_unknown_image_raises_not_found(api_only):
    client, _ = client_of(api_only)
    with pytest.raises(ApiError) as raised:
        client.get("00000000-0000-4000-8000-000000000000")
    assert (raised.value.status, raised.value.code) == (404, "not_found")


def test_wait_gives_up_with_a_timeout_error_when_no_worker_runs(api_only):
    client, _ = client_of(api_only)
    image = client.submit(PHOTOS / PORTRAIT)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=image["id"]):
        client.wait(image["id"], timeout=3)
    assert time.monotonic() - started < 30  # bounded, whatever the backoff


def test_the_annotated_image_of_an_unfinished_job_raises_not_ready(api_only, tmp_path):
    client, _ = client_of(api_only)
    image = client.submit(PHOTOS / PORTRAIT)
    with pytest.raises(ApiError) as raised:
        client.download(image["id"], tmp_path / "annotated.jpg")
    assert (raised.value.status, raised.value.code) == (409, "not_ready")
    assert list(tmp_path.iterdir()) == []


def test_delete_removes_the_image(api_only):
    client, _ = client_of(api_only)
    image = client.submit(PHOTOS / PORTRAIT)
    client.delete(image["id"])
    with pytest.raises(ApiError) as raised:
        client.get(image["id"])
    assert raised.value.code == "not_found"


# --- the command line ---

def facedetect(base_url, api_key, *args, timeout=240):
    """Run the `facedetect` command as an integrator would, from the checkout's client/."""
    env = {**os.environ, "FACEDETECT_URL": base_url, "PYTHONPATH": str(ROOT / "client")}
    env.pop("FACEDETECT_API_KEY", None)
    if api_key is not None:
        env["FACEDETECT_API_KEY"] = api_key
    return subprocess.run([sys.executable, "-m", "facedetect.cli", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_the_cli_submits_waits_saves_the_annotated_image_and_lists_it(stack, tmp_path):
    _, credentials = client_of(stack)
    key, out = credentials["api_key"], tmp_path / "annotated.jpg"

    submitted = facedetect(stack.base_url, key, "submit", PHOTOS / PORTRAIT, "--request-id", "cli-1", "--wait",
                           "--out", out)
    assert submitted.returncode == 0, submitted.stderr
    image = json.loads(submitted.stdout)
    assert image["status"] == "done" and image["face_count"] == 1
    assert decoded(out) == ("JPEG", (image["width"], image["height"]))

    listed = facedetect(stack.base_url, key, "list", "--status", "done")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:3] == ["ID", "STATUS", "FACES"]
    assert row.split()[:4] == [image["id"], "done", "1", "cli-1"]
    as_json = facedetect(stack.base_url, key, "list", "--json")
    assert [listed["id"] for listed in json.loads(as_json.stdout)["results"]] == [image["id"]]

    shown = facedetect(stack.base_url, key, "get", image["id"])
    assert json.loads(shown.stdout)["faces"] == image["faces"]
    original = tmp_path / "original.jpg"
    assert facedetect(stack.base_url, key, "download", image["id"], "--out", original, "--original").returncode == 0
    assert original.read_bytes() == (PHOTOS / PORTRAIT).read_bytes()


def test_the_cli_explains_failures_without_a_traceback(api_only, tmp_path):
    _, credentials = client_of(api_only)
    key = credentials["api_key"]
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("just text")

    failures = {
        "bad key": (facedetect(api_only.base_url, "fd_wrong", "list"), 1, "not_authenticated"),
        "no key": (facedetect(api_only.base_url, None, "list"), 2, "FACEDETECT_API_KEY"),
        "not an image": (facedetect(api_only.base_url, key, "submit", not_a_photo), 1, "invalid_image"),
        "missing file": (facedetect(api_only.base_url, key, "submit", tmp_path / "absent.jpg"), 1, "absent.jpg"),
        "unknown id": (facedetect(api_only.base_url, key, "download", "00000000-0000-4000-8000-000000000000",
                                  "--out", tmp_path / "x.jpg"), 1, "not_found"),
        "no worker": (facedetect(api_only.base_url, key, "submit", PHOTOS / PORTRAIT, "--wait", "--timeout", "2"), 3,
                      "after 2 s"),
    }
    for name, (result, status, says) in failures.items():
        assert result.returncode == status, (name, result.stderr)
        assert says in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, name


def test_the_cli_says_so_when_the_api_cannot_be_reached():
    result = facedetect(f"http://127.0.0.1:{free_port()}", "fd_any", "list", timeout=60)
    assert result.returncode == 1
    assert "facedetect: error:" in result.stderr and "Traceback" not in result.stderr

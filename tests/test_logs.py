"""The logs carry the job's image id and request_id: JSON objects by default (compose, Kubernetes),
one readable line an event with LOG_FORMAT=text (`make run`)."""

import io
import json
import logging
import logging.config
import os
import re
import subprocess
import sys

import pytest
import yaml
from django.conf import settings

from face_detect_api import logs
from tests.conftest import ROOT, upload

pytestmark = pytest.mark.django_db(transaction=True)


def captured(config, action):
    """What `action()` logs through the console handler of the LOGGING `config`."""
    stream = io.StringIO()
    config = {**config, "handlers": {"console": {**config["handlers"]["console"], "stream": stream}}}
    logging.config.dictConfig(config)
    try:
        result = action()
    finally:
        logging.config.dictConfig(settings.LOGGING)
    return result, stream.getvalue()


def with_format(log_format):
    return {**settings.LOGGING, "handlers": {"console": {**settings.LOGGING["handlers"]["console"], "formatter": log_format}}}


def test_an_upload_logs_json_with_the_image_and_request_ids(api):
    def act():
        response = upload(api, request_id="log-me")
        logging.getLogger("api.test").info("after the upload")
        return response

    response, output = captured(settings.LOGGING, act)
    lines = [json.loads(line) for line in output.splitlines()]
    ours = [line for line in lines if line["message"] == "after the upload"]
    assert ours and ours[0]["image_id"] == response.json()["id"] and ours[0]["request_id"] == "log-me"
    assert {"time", "level", "logger"} <= set(ours[0])


def test_text_logs_are_one_line_an_event_with_time_process_level_message_and_image_id(api):
    def act():
        logs.clear()  # as the middleware does before each request: nothing bound yet
        logging.getLogger("api.test").warning("before any upload")
        response = upload(api, request_id="read-me")
        logging.getLogger("api.test").info("after the upload:\nsecond line")
        return response

    response, output = captured(with_format("text"), act)
    lines = output.splitlines()
    image_id = response.json()["id"]

    (before,) = [line for line in lines if "before any upload" in line]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} MainProcess\[\d+\] WARNING api\.test: before any upload",
                        before)
    (after,) = [line for line in lines if "after the upload" in line]
    assert after.endswith(f"INFO api.test: after the upload:\\nsecond line image_id={image_id} request_id=read-me")
    assert not any(line.lstrip().startswith("{") for line in lines)


def run_settings(log_format):
    """LOG_FORMAT as a fresh process's settings read it: (exit status, LOGGING's formatter or error)."""
    code = ("import django; django.setup(); from django.conf import settings; "
            "print(settings.LOGGING['handlers']['console']['formatter'])")
    env = {key: value for key, value in os.environ.items() if key != "LOG_FORMAT"}
    if log_format is not None:
        env["LOG_FORMAT"] = log_format
    env["DJANGO_SETTINGS_MODULE"] = "face_detect_api.settings"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout.strip() if result.returncode == 0 else result.stderr)


def test_log_format_defaults_to_json_and_refuses_an_unknown_value():
    assert run_settings(None) == (0, "json")
    assert run_settings("text") == (0, "text")
    status, error = run_settings("pretty")
    assert status != 0 and "LOG_FORMAT" in error


def test_make_run_logs_text_while_compose_and_kubernetes_log_json():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: export LOG_FORMAT \?= text$", makefile, re.MULTILINE)
    env_env = dict(line.split("=", 1) for line in (ROOT / "env.env").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert env_env["LOG_FORMAT"] == "json"
    config_map = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    assert config_map["data"]["LOG_FORMAT"] == "json"

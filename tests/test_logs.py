"""The API's log lines are JSON objects carrying the job's image id and request_id."""

import io
import json
import logging
import logging.config

import pytest
from django.conf import settings

from tests.conftest import upload

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_upload_logs_json_with_the_image_and_request_ids(api):
    stream = io.StringIO()
    config = {**settings.LOGGING, "handlers": {"console": {**settings.LOGGING["handlers"]["console"], "stream": stream}}}
    logging.config.dictConfig(config)
    try:
        response = upload(api, request_id="log-me")
        logging.getLogger("api.test").info("after the upload")
    finally:
        logging.config.dictConfig(settings.LOGGING)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ours = [line for line in lines if line["message"] == "after the upload"]
    assert ours and ours[0]["image_id"] == response.json()["id"] and ours[0]["request_id"] == "log-me"
    assert {"time", "level", "logger"} <= set(ours[0])

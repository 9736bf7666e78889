"""`facedetect.verify_webhook`: checked against the Standard Webhooks reference library signing the
same payloads, and against a real callback sent by a running stack."""

import base64
import json
import os
import time
from datetime import UTC, datetime

import pytest
from facedetect import WebhookVerificationError, verify_webhook
from facedetect.api import Client
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from tests.conftest import PHOTOS, wait_for

SECRET = "whsec_" + base64.b64encode(b"a secret of thirty-two bytes....").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BODY = json.dumps({"type": "image.done", "timestamp": "2025-01-01T00:00:00Z", "data": {"id": "x", "face_count": 2}})


def signed(body=BODY, msg_id="msg_2Lq", at=None, secret=SECRET):
    """Headers for `body` as the reference library signs them, `at` Unix seconds (default now)."""
    at = int(time.time()) if at is None else at
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(at, tz=UTC), body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(at), "webhook-signature": signature}


def test_it_accepts_what_the_reference_library_signs_and_returns_the_payload():
    assert verify_webhook(signed(), BODY.encode(), SECRET) == json.loads(BODY)
    assert verify_webhook(signed(), BODY, SECRET) == json.loads(BODY)  # a str body is its UTF-8 bytes


@settings(max_examples=200, deadline=None)
@given(payload=st.dictionaries(st.text(), st.one_of(st.text(), st.integers(), st.none())),
       msg_id=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
       key=st.binary(min_size=1, max_size=64))
def test_it_agrees_with_the_reference_library_on_any_payload(payload, msg_id, key):
    secret = "whsec_" + base64.b64encode(key).decode()
    body = json.dumps(payload, ensure_ascii=False)
    headers = signed(body, msg_id=msg_id, secret=secret)
    assert verify_webhook(headers, body.encode(), secret) == Webhook(secret).verify(body, headers)


def test_header_names_are_matched_in_any_case():
    headers = {name.title(): value for name, value in signed().items()}
    headers["WEBHOOK-SIGNATURE"] = headers.pop("Webhook-Signature")
    assert verify_webhook(headers, BODY.encode(), SECRET)["type"] == "image.done"


def test_the_secret_may_come_without_its_prefix_or_padding():
    bare = SECRET.removeprefix("whsec_").rstrip("=")
    assert verify_webhook(signed(), BODY.encode(), bare)["type"] == "image.done"


def test_any_one_of_several_signatures_will_do():
    headers = signed()
    good = headers["webhook-signature"]
    forged = "v1," + base64.b64encode(os.urandom(32)).decode()
    headers["webhook-signature"] = f"{forged} v1a,ed25519stuff garbage v1,!!notbase64!! {good}"
    assert verify_webhook(headers, BODY.encode(), SECRET)["type"] == "image.done"

    headers["webhook-signature"] = f"{forged} v1a,ed25519stuff"
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify_webhook(headers, BODY.encode(), SECRET)


def test_only_v1_signatures_count():
    headers = signed()
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, BODY.encode(), SECRET)


@pytest.mark.parametrize("tamper", ["body", "id", "timestamp", "secret"])
def test_anything_changed_after_signing_is_refused(tamper):
    headers, body, secret = signed(), BODY.encode(), SECRET
    if tamper == "body":
        body = body.replace(b'"face_count": 2', b'"face_count": 3')
    elif tamper == "id":
        headers["webhook-id"] += "x"
    elif tamper == "timestamp":
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    else:
        secret = OTHER_SECRET
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify_webhook(headers, body, secret)


@pytest.mark.parametrize(("offset", "says"), [(-310, "too old"), (310, "too new")])
def test_a_correctly_signed_message_outside_the_tolerance_is_refused(offset, says):
    headers = signed(at=int(time.time()) + offset)
    with pytest.raises(WebhookVerificationError, match=says):
        verify_webhook(headers, BODY.encode(), SECRET)
    # Within a tolerance the receiver chose, the same message passes.
    assert verify_webhook(headers, BODY.encode(), SECRET, tolerance=600)["type"] == "image.done"


@pytest.mark.parametrize("value", ["", "12.5", "-5", "soon", "1e9", " "])
def test_a_timestamp_that_is_not_integer_seconds_is_refused(value):
    headers = signed()
    headers["webhook-timestamp"] = value
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, BODY.encode(), SECRET)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_refused(missing):
    headers = signed()
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify_webhook(headers, BODY.encode(), SECRET)


def test_a_signed_body_that_is_not_json_is_refused():
    with pytest.raises(WebhookVerificationError, match="not JSON"):
        verify_webhook(signed("not json"), b"not json", SECRET)


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", ""])
def test_an_unusable_secret_is_a_configuration_error(secret):
    with pytest.raises(ValueError):
        verify_webhook(signed(), BODY.encode(), secret)


@pytest.mark.e2e
def test_a_real_callback_verifies_and_forgeries_of_it_do_not(make_stack, receiver):
    stack, _database = make_stack()
    stack.start_all()
    credentials = stack.create_client()
    secret = credentials["webhook_secret"]
    client = Client(stack.base_url, credentials["api_key"])
    image = client.submit(PHOTOS / "clm_cage.jpg", callback_url=receiver.url("/hook"))
    wait_for(lambda: receiver.received("/hook"), timeout=180, message="the callback")

    callback = receiver.received("/hook")[0]
    headers, body = callback["headers"], callback["body"]
    payload = verify_webhook(headers, body, secret)
    assert payload["type"] == "image.done" and payload["data"]["id"] == image["id"]
    assert payload == Webhook(secret).verify(body, headers)  # the reference library agrees

    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, body.replace(b'"image.done"', b'"image.failed"'), secret)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, body, stack.create_client()["webhook_secret"])
    # A replay long after the event: correctly signed, but stale.
    stale = signed(body.decode(), msg_id=headers["webhook-id"], at=int(time.time()) - 3600, secret=secret)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify_webhook(stale, body, secret)

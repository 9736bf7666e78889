"""Each face's pose and quality reach integrators: in the image resource and in the callback
payload, and faces stored before they existed still serialise (as null)."""

import json

import pytest

from api.models import Face, Image
from tests.conftest import photo, wait_for
from workers import detection, events, face_quality

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def done_image(integrator, receiver):
    """A finished image with a face found now (pose and quality from the real detector) and a face
    stored before the migration (neither)."""
    image = Image.objects.create(
        client=integrator[0], request_id="pq-1", original_key="originals/pq.jpg", sha256="1" * 64, size_bytes=10,
        format="JPEG", width=500, height=614, status="done", face_count=2, annotated_key="annotated/pq.jpg",
        callback_url=receiver.url("/pq"), **events.pending_fields(),
    )
    upright = detection.load_upright_rgb(photo("clm_cage.jpg"))
    [face] = face_quality.describe_all(upright, detection.find_faces(upright))
    Face.objects.create(image=image, index=0, confidence=face["confidence"], keypoints=face["keypoints"],
                        pose=face["pose"], quality=face["quality"], **face["box"])
    Face.objects.create(image=image, index=1, x=1, y=2, width=30, height=40, confidence=0.95,
                        keypoints={name: [5, 6] for name in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")})
    return image, face


def test_the_image_resource_shows_each_faces_pose_and_quality(api, done_image):
    image, face = done_image
    body = api.get(f"/api/v1/images/{image.pk}/").json()

    new, old = body["faces"]
    assert new["pose"] == face["pose"] and set(new["pose"]) == {"yaw", "pitch", "roll"}
    assert new["quality"] == face["quality"] and set(new["quality"]) == {"sharpness", "brightness", "contrast", "ipd"}
    assert old["pose"] is None and old["quality"] is None


def test_the_callback_payload_carries_each_faces_pose_and_quality(done_image, receiver):
    """Delivered by the callbacks worker's own delivery loop, run in this process."""
    from workers import delivery

    image, face = done_image
    loop = delivery.DeliveryLoop().start()
    try:
        [request] = wait_for(lambda: receiver.received("/pq"), timeout=30, message="the callback")
    finally:
        loop.stop(timeout=15)
    new, old = json.loads(request["body"])["data"]["faces"]
    assert new["pose"] == face["pose"] and new["quality"] == face["quality"]
    assert old["pose"] is None and old["quality"] is None

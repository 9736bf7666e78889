"""The OpenAPI schema is valid, documents every endpoint and the callback events, and the real
responses match it."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from rest_framework.test import APIClient

from tests.conftest import photo, upload

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def spec(django_db_blocker):
    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def conforms(spec, component, body):
    schema = {"$ref": f"#/components/schemas/{component}", "components": spec["components"]}
    OAS31Validator(schema).validate(body)


def test_the_schema_is_valid_openapi(spec):
    validate(spec)
    assert spec["openapi"].startswith("3.1")


def test_every_endpoint_and_the_callback_events_are_documented(spec):
    assert set(spec["paths"]) >= {
        "/api/v1/images/", "/api/v1/images/{id}/", "/api/v1/images/{id}/original", "/api/v1/images/{id}/annotated",
        "/api/v1/batches/", "/api/v1/batches/{id}/", "/api/v1/health/",
    }
    create = spec["paths"]["/api/v1/images/"]["post"]
    assert {"202", "200", "400", "401", "409", "413", "429", "503"} <= set(create["responses"])
    assert "imageEvent" in create["callbacks"]
    assert set(spec["webhooks"]) == {"image_event", "batch_event"}
    fields = spec["components"]["schemas"]["ImageUploadRequest"]["properties"]
    assert set(fields) >= {"image", "image_url", "request_id", "callback_url", "min_face_size", "min_confidence", "annotation"}


def test_real_responses_match_the_schema(spec, api, client_factory):
    created = upload(api, "clm_cage.jpg", request_id="schema-1", callback_url="http://127.0.0.1:9/h")
    conforms(spec, "Image", created.json())
    conforms(spec, "Image", api.get(f"/api/v1/images/{created.json()['id']}/").json())
    conforms(spec, "PaginatedImageList", api.get("/api/v1/images/").json())

    batch = api.post("/api/v1/batches/", {"images": [SimpleUploadedFile("a.jpg", photo("clm_cage.jpg"))]},
                     format="multipart")
    conforms(spec, "Batch", batch.json())

    for response in (upload(api, data=b"not an image"), api.get("/api/v1/images/00000000-0000-0000-0000-000000000000/"),
                     APIClient().get("/api/v1/images/")):
        assert response.status_code >= 400
        conforms(spec, "Error", response.json())
    conforms(spec, "Health", APIClient().get("/api/v1/health/").json())


def test_a_finished_image_matches_the_schema(spec, api):
    from api.models import Face, Image

    image = Image.objects.get(pk=upload(api).json()["id"])
    Image.objects.filter(pk=image.pk).update(status="done", face_count=1, annotated_key="annotated/x.jpg")
    keypoints = {k: [1, 2] for k in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")}
    Face.objects.create(image=image, index=0, x=1, y=2, width=3, height=4, confidence=0.99, keypoints=keypoints)
    Face.objects.create(image=image, index=1, x=1, y=2, width=3, height=4, confidence=0.99, keypoints=keypoints,
                        pose={"yaw": -90.0, "pitch": 12.5, "roll": 180.0},
                        quality={"sharpness": 1.0, "brightness": 0.0, "contrast": 0.5, "ipd": 0.0})
    body = api.get(f"/api/v1/images/{image.pk}/").json()
    assert body["faces"][0]["pose"] is None and body["faces"][1]["pose"]["roll"] == 180.0
    conforms(spec, "Image", body)


def test_pose_and_quality_are_documented_with_their_ranges(spec):
    schemas = spec["components"]["schemas"]
    assert set(schemas["FaceDoc"]["required"]) >= {"pose", "quality"}
    pose, quality = schemas["Pose"]["properties"], schemas["Quality"]["properties"]
    assert [(pose[k]["minimum"], pose[k]["maximum"]) for k in ("yaw", "pitch", "roll")] == [(-90, 90), (-90, 90), (-180, 180)]
    assert all((quality[k]["minimum"], quality[k]["maximum"]) == (0, 1) for k in ("sharpness", "brightness", "contrast"))
    assert quality["ipd"]["minimum"] == 0


def test_swagger_ui_is_served_without_a_cdn():
    page = APIClient().get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "swagger-ui" in html and "cdn" not in html.lower()


def test_url_fields_are_http_urls_in_the_schema(spec):
    import re

    from api.serializers import HTTP_URL_PATTERN

    schemas = spec["components"]["schemas"]
    fields = [schemas["ImageUploadRequest"]["properties"]["image_url"],
              schemas["ImageUploadRequest"]["properties"]["callback_url"],
              schemas["ImageUrlUploadRequest"]["properties"]["image_url"],
              schemas["BatchSubmitRequest"]["properties"]["image_urls"]["items"],
              schemas["BatchSubmitRequest"]["properties"]["callback_url"],
              schemas["BatchSubmitRequest"]["properties"]["image_callback_url"]]
    for field in fields:
        assert field["type"] == "string" and field["format"] == "uri" and field["maxLength"] == 2000
        assert field["pattern"] == HTTP_URL_PATTERN
    pattern = re.compile(HTTP_URL_PATTERN)
    assert pattern.fullmatch("https://example.com/hook?a=1") and pattern.fullmatch("HTTP://127.0.0.1:8000")
    for url in ("ftp://example.com", "example.com", "http://u:p@example.com", "http://a b", "http://", "http://a\n"):
        assert not pattern.fullmatch(url), url


def test_a_submission_names_its_photos_one_way_and_json_carries_urls_only(spec):
    images = spec["paths"]["/api/v1/images/"]["post"]["requestBody"]
    batches = spec["paths"]["/api/v1/batches/"]["post"]["requestBody"]
    assert images["required"] and batches["required"]
    schemas = spec["components"]["schemas"]
    assert schemas["ImageUploadRequest"]["oneOf"] == [{"required": ["image"]}, {"required": ["image_url"]}]
    assert images["content"]["application/json"]["schema"]["$ref"].endswith("/ImageUrlUploadRequest")
    assert "image" not in schemas["ImageUrlUploadRequest"]["properties"]
    assert schemas["ImageUrlUploadRequest"]["required"] == ["image_url"]
    assert batches["content"]["application/json"]["schema"]["$ref"].endswith("/BatchUrlSubmitRequest")
    assert schemas["BatchUrlSubmitRequest"]["required"] == ["image_urls"]
    for body, part in ((images, "image"), (batches, "images")):
        assert body["content"]["multipart/form-data"]["encoding"][part]["contentType"].startswith("image/jpeg")


def test_links_lead_from_a_created_image_or_batch_to_the_operations_taking_its_id(spec):
    operations = {op["operationId"]: (path, method) for path, item in spec["paths"].items() for method, op in item.items()}
    create_image = spec["paths"]["/api/v1/images/"]["post"]["responses"]
    for status in ("202", "200"):
        links = create_image[status]["links"]
        targets = {operations[link["operationId"]] for link in links.values()}
        assert targets == {("/api/v1/images/{id}/", "get"), ("/api/v1/images/{id}/", "delete"),
                           ("/api/v1/images/{id}/original", "get"), ("/api/v1/images/{id}/annotated", "get")}
        assert all(link["parameters"] == {"id": "$response.body#/id"} for link in links.values())
    batch_links = spec["paths"]["/api/v1/batches/"]["post"]["responses"]["202"]["links"]
    assert operations[batch_links["GetBatch"]["operationId"]] == ("/api/v1/batches/{id}/", "get")
    assert batch_links["GetBatch"]["parameters"] == {"id": "$response.body#/id"}
    assert operations[batch_links["GetFirstImage"]["operationId"]] == ("/api/v1/images/{id}/", "get")


def test_list_parameters_say_what_the_lists_accept(spec):
    for path in ("/api/v1/images/", "/api/v1/batches/"):
        (page,) = [p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "page"]
        assert page["schema"] == {"type": "integer", "minimum": 1}
    (request_id,) = [p for p in spec["paths"]["/api/v1/images/"]["get"]["parameters"] if p["name"] == "request_id"]
    assert request_id["schema"]["maxLength"] == 128 and request_id["schema"]["minLength"] == 1

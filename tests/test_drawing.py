"""Annotated output: same size as the upright original, faces marked or masked, no metadata."""

import io

import PIL.Image
import pytest

from tests.conftest import photo
from workers import drawing

FACE = {"box": {"x": 100, "y": 120, "width": 200, "height": 240}, "confidence": 0.99,
        "keypoints": {"left_eye": [150, 200], "right_eye": [250, 200], "nose": [200, 250],
                      "mouth_left": [160, 300], "mouth_right": [240, 300]}}


def jpeg_with_exif(orientation=1):
    """clm_cage.jpg re-saved with GPS coordinates, a camera make and an orientation tag."""
    image = PIL.Image.open(io.BytesIO(photo("clm_cage.jpg")))
    exif = PIL.Image.Exif()
    exif[0x010F] = "SpyCam"
    exif[0x0112] = orientation
    exif[0x8825] = {1: "N", 2: (52.0, 22.0, 1.0), 3: "E", 4: (4.0, 53.0, 2.0)}
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["boxes", "blur", "pixelate"])
def test_the_output_keeps_the_size_and_drops_all_exif(mode):
    data, fmt = drawing.annotate(jpeg_with_exif(), [FACE], mode)

    output = PIL.Image.open(io.BytesIO(data))
    assert fmt == output.format == "JPEG"
    assert output.size == (500, 614)
    assert not output.getexif()
    assert b"SpyCam" not in data


def test_orientation_is_applied_before_drawing():
    data, _ = drawing.annotate(jpeg_with_exif(orientation=6), [], "boxes")
    assert PIL.Image.open(io.BytesIO(data)).size == (614, 500)


def test_png_stays_png():
    data, fmt = drawing.annotate(photo("skimage_astronaut.png"), [FACE], "boxes")
    assert fmt == "PNG" and PIL.Image.open(io.BytesIO(data)).format == "PNG"


def test_boxes_are_drawn_on_the_face_outline():
    data, _ = drawing.annotate(photo("skimage_astronaut.png"), [FACE], "boxes")
    output = PIL.Image.open(io.BytesIO(data)).convert("RGB")
    assert output.getpixel((100, 200)) == drawing.BOX_COLOUR  # left edge of the box
    assert output.getpixel((200, 250)) == drawing.POINT_COLOUR  # the nose


@pytest.mark.parametrize("mode", ["blur", "pixelate"])
def test_masking_changes_the_face_and_nothing_far_from_it(mode):
    source = PIL.Image.open(io.BytesIO(photo("skimage_astronaut.png"))).convert("RGB")
    data, _ = drawing.annotate(photo("skimage_astronaut.png"), [FACE], mode)
    output = PIL.Image.open(io.BytesIO(data)).convert("RGB")

    face = (120, 140, 280, 340)
    assert output.crop(face).tobytes() != source.crop(face).tobytes()
    far = (400, 0, 512, 100)
    assert output.crop(far).tobytes() == source.crop(far).tobytes()


def test_no_icc_profile_or_text_chunk_of_the_original_survives():
    from PIL import ImageCms, PngImagePlugin

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    text = PngImagePlugin.PngInfo()
    text.add_text("Author", "SpyCam owner")
    buffer = io.BytesIO()
    PIL.Image.open(io.BytesIO(photo("skimage_astronaut.png"))).save(buffer, "PNG", pnginfo=text, icc_profile=profile)

    for source in (buffer.getvalue(), jpeg_with_exif()):
        with PIL.Image.open(io.BytesIO(source)) as original:
            if original.format == "JPEG":
                jpeg = io.BytesIO()
                original.save(jpeg, "JPEG", exif=original.getexif(), icc_profile=profile)
                source = jpeg.getvalue()
        data, _ = drawing.annotate(source, [FACE], "boxes")
        output = PIL.Image.open(io.BytesIO(data))
        assert "icc_profile" not in output.info and not output.getexif()
        assert b"SpyCam" not in data

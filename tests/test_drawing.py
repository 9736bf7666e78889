"""Annotated output: same size as the upright original, faces marked or masked, no metadata."""

import io

import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3 * drawing.PNG_BLOCK_ROWS), st.integers(0, 2**32 - 1))
def test_the_png_encoder_keeps_every_pixel(width, height, seed):
    # Noise is the hardest case for the Up filter's wrap-around; odd widths make rows of odd length,
    # and heights cross the blocks the rows are filtered in.
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = drawing.encode_png(PIL.Image.fromarray(pixels, "RGB"))

    with PIL.Image.open(io.BytesIO(data)) as decoded:
        decoded.verify()  # every chunk's CRC
    with PIL.Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG" and decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), pixels)


def test_the_png_encoder_keeps_a_photo_exactly_at_about_the_size_of_pillows():
    image = PIL.Image.open(io.BytesIO(photo("skimage_astronaut.png"))).convert("RGB")
    data = drawing.encode_png(image)

    assert PIL.Image.open(io.BytesIO(data)).tobytes() == image.tobytes()
    pillow = io.BytesIO()
    image.save(pillow, "PNG", compress_level=1)
    assert len(data) < 1.2 * len(pillow.getvalue())


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_the_png_encoder_refuses_other_modes(mode):
    with pytest.raises(ValueError, match=mode):
        drawing.encode_png(PIL.Image.new(mode, (4, 4)))

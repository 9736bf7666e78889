"""The resolution policy: how a photo is scaled for MTCNN, and mapped back."""

import pytest

from workers.detection import plan


@pytest.mark.parametrize(
    "size,min_face,scale,mtcnn_min",
    [
        ((500, 614), 20, 1.0, 20.0),           # small photos are left alone
        ((1920, 1280), 20, 1024 / 1920, 12.0),  # large ones shrink; 20 px becomes 10.7, floored at 12
        ((1024, 768), 40, 0.5, 20.0),           # a large minimum is honoured by shrinking further
        ((1024, 768), 12, 1.0, 12.0),
        ((4000, 3000), 400, 20 / 400, 20.0),
    ],
)
def test_plan(size, min_face, scale, mtcnn_min):
    how = plan(*size, min_face, max_side=1024)
    assert how.scale == pytest.approx(scale)
    assert how.mtcnn_min_face_size == pytest.approx(mtcnn_min)


def test_mtcnn_is_never_asked_for_a_minimum_it_cannot_handle():
    """mtcnn 1.0.0 silently returns nothing for min_face_size >= 30."""
    for min_face in range(1, 2000, 7):
        assert 12 <= plan(3000, 2000, min_face, max_side=1024).mtcnn_min_face_size <= 20

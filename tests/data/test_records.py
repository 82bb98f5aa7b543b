import numpy as np
import pytest

from medisee.data.codec import (
    BadRecord,
    check_mask,
    decode_image,
    encode_png,
    mask_box,
    mask_to_rle,
    rle_to_mask,
)
from medisee.data.records import LoadedImage, LoadedTarget, rows_for_image


def test_png_round_trip_keeps_pixels_and_stores_gray_as_one_channel():
    img = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    rgb = np.repeat(img[..., None], 3, 2)
    assert np.array_equal(decode_image(encode_png(rgb)), rgb)
    assert len(encode_png(rgb)) < len(encode_png(np.dstack([img, img, 255 - img])))


def test_mask_checks():
    with pytest.raises(BadRecord, match="empty_mask"):
        check_mask(np.zeros((4, 4), np.uint8))
    with pytest.raises(BadRecord, match="mask_not_binary"):
        check_mask(np.array([[0, 7], [255, 0]], np.uint8))
    with pytest.raises(BadRecord, match="mask_shape_mismatch"):
        check_mask(np.ones((4, 4), np.uint8), (4, 5))
    assert check_mask(np.array([[0, 1], [1, 0]], np.uint8)).dtype == bool


def test_box_is_pixel_xyxy_with_exclusive_far_edge():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == [3.0, 2.0, 9.0, 5.0]


def test_rle_round_trip():
    mask = np.random.default_rng(1).random((17, 23)) > 0.5
    assert np.array_equal(rle_to_mask(mask_to_rle(mask)), mask)


def test_bad_image_quarantines_every_record_it_carries():
    loaded = LoadedImage(
        "k",
        "ref",
        "ct",
        "train",
        BadRecord("unreadable_image", "x"),
        [LoadedTarget("liver", np.ones((2, 2)), "m1"), LoadedTarget("spleen", np.ones((2, 2)), "m2")],
        ["kidney"],
    )
    rows = rows_for_image("src", loaded)
    assert len(rows) == 3 and {r["reason"] for r in rows} == {"unreadable_image"}
    assert {r["input_ref"] for r in rows} == {"m1", "m2", "ref"}

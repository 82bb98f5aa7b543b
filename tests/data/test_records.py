import numpy as np
import pytest

from medisee.data import prompts
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


def test_box_is_pixel_xyxy_with_the_last_pixel_included():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:9] = True  # rows 2..4, columns 3..8
    assert mask_box(mask) == [3.0, 2.0, 8.0, 4.0]


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


def good_image(targets, absent=()):
    image = np.zeros((8, 8, 3), np.uint8)
    return LoadedImage("k", "ref", "ct", "train", image, targets, list(absent))


def test_referring_and_false_rows_use_the_reference_templates():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    rows = rows_for_image("src", good_image([LoadedTarget("inferior_vena_cava", mask, "m")], ["kidney"]))
    by_kind = {r["query_kind"]: r for r in rows}
    ref, false = by_kind["referring"], by_kind["false_query"]
    assert ref["query"] in [q.format(name="inferior vena cava") for q in prompts.REFERRING_QUERIES]
    assert ref["answer"] in prompts.ANSWERS
    assert false["query"] in [q.format(name="kidney") for q in prompts.REFERRING_QUERIES]
    assert false["answer"] == "There is no kidney in this image."
    again = rows_for_image("src", good_image([LoadedTarget("inferior_vena_cava", mask, "m")], ["kidney"]))
    assert [(r["query"], r["answer"]) for r in again] == [(r["query"], r["answer"]) for r in rows]


def test_reference_template_text():
    assert prompts.REFERRING_QUERIES[0] == "Can you segment and locate the {name} in this image?"
    assert len(prompts.REFERRING_QUERIES) == 4 and len(prompts.ANSWERS) == 5
    assert len(prompts.REASONING_SUFFIXES) == 6 and len(prompts.REASONING_ANSWERS) == 5
    assert prompts.FIXED_ANSWER == "[SEG] and [BBOX]." and prompts.TEMPLATE_VERSION == "medisee-ref-2"


def test_reasoning_puts_the_suffix_after_the_query_and_the_tokens_before_the_explanation():
    seen = set()
    for i in range(60):
        question, answer = prompts.reasoning("Which organ makes bile?", "It makes bile.", f"id/{i}")
        query, suffix = question.split("? ", 1)
        assert query == "which organ makes bile" and suffix in prompts.REASONING_SUFFIXES  # lower-cased
        tokens, explanation = answer.split("[BBOX]. ", 1)
        assert explanation == "it makes bile." and "[SEG]" in tokens
        seen.add(answer)
    assert len(seen) == 5  # every form, and the first form's extra full stop is not doubled
    assert prompts.reasoning("Q?", "E", "x") == prompts.reasoning("Q?", "E", "x")
    _, plain = prompts.reasoning("Q?", None, "x")
    assert plain in prompts.ANSWERS


def exif_rotated_jpeg(orientation: int = 6) -> tuple[bytes, np.ndarray]:
    """A 40×20 JPEG whose EXIF orientation says "rotate 90° clockwise to view", and the upright array."""
    import io

    from PIL import Image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue(), np.rot90(stored, k=-1)


def test_every_front_end_reads_an_exif_rotated_photo_upright_and_checks_pixels_from_the_header():
    from medisee.data.codec import BadRecord, decode_image
    from medisee.serving.requests import ApiError, decode_upload

    data, upright = exif_rotated_jpeg()
    batch = decode_image(data)
    served = decode_upload(data, max_pixels=10_000, max_bytes=1 << 20)
    assert batch.shape == served.shape == upright.shape == (40, 20, 3)
    assert np.array_equal(batch, served)
    assert np.abs(batch.astype(int) - upright).mean() < 8  # JPEG noise only: the band is on top now
    with pytest.raises(BadRecord) as refused:
        decode_image(data, max_pixels=799)
    assert refused.value.reason == "too_large"
    with pytest.raises(ApiError) as answered:
        decode_upload(data, max_pixels=799, max_bytes=1 << 20)
    assert answered.value.status == 413
    with pytest.raises(BadRecord) as broken:
        decode_image(data[: len(data) // 2] + b"\x00" * 7)
    assert broken.value.reason == "unreadable_image"


def test_predict_reads_the_first_frame_of_a_dicom_as_serving_does(tmp_path):
    from pydicom.data import get_testdata_file

    from medisee.cli import _read_image
    from medisee.config import load_config
    from medisee.data.codec import BadRecord
    from medisee.serving.requests import decode_upload

    path = get_testdata_file("examples_ybr_color.dcm")  # 30 JPEG frames of 240 × 320, YBR
    cfg = load_config("tiny")
    first = _read_image(path, cfg)
    with open(path, "rb") as f:
        served = decode_upload(f.read(), max_pixels=100_000, max_bytes=16 << 20)
    assert first.shape == (240, 320, 3) and np.array_equal(first, served)
    small = load_config("tiny", ["prepare.max_dicom_bytes=1000000"])  # 30 × 240 × 320 × 3 bytes is over
    with pytest.raises(BadRecord) as refused:
        _read_image(path, small)
    assert refused.value.reason == "too_large"


def test_a_one_pixel_strip_keeps_one_pixel_in_the_sam_frame():
    from medisee.data.preprocess import sam_input

    strip = np.full((1, 20000, 3), 200, np.uint8)
    frame_image, frame = sam_input(strip, 1024)
    assert frame.resized_hw == (1, 1024)  # 1 × 1024/20000 rounds to 0 without the floor of one pixel
    assert (
        frame_image.shape == (1024, 1024, 3) and (frame_image[0] == 200).all() and not frame_image[1:].any()
    )

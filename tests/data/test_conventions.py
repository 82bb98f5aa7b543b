"""Conventions shared with the MediSee reference, each checked against an independent computation:
boxes from masks include their last pixel, and the CLIP input is sized as CLIPImageProcessor sizes it."""

import numpy as np
import pytest
from PIL import Image

from medisee.data.codec import mask_box
from medisee.data.preprocess import clip_crop, clip_input, clip_resized_hw
from medisee.data.records import LoadedImage, LoadedTarget, rows_for_image

SQUARES = [  # (n, top, left, height, width)
    (5, 3, 7, 20, 30),
    (1, 0, 0, 4, 4),
    (10, 10, 20, 20, 30),  # touching the bottom and right edges
    (64, 17, 0, 333, 512),
]


def square(n: int, top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[top : top + n, left : left + n] = True
    return mask


@pytest.mark.parametrize(("n", "top", "left", "height", "width"), SQUARES)
def test_a_square_mask_gives_the_inclusive_box_the_reference_normalises_by_the_image_size(
    n, top, left, height, width
):
    mask = square(n, top, left, height, width)
    last_x, last_y = left + n - 1, top + n - 1  # the last foreground column and row
    assert mask_box(mask) == [left, top, last_x, last_y]

    loaded = LoadedImage("k", "ref", "ct", "test", np.zeros((height, width, 3), np.uint8))
    loaded.targets = [LoadedTarget("liver", mask, "m")]
    (row,) = rows_for_image("src", loaded)
    assert row["box"] == [left, top, last_x, last_y]
    # the reference's normalised box: x_min / W, y_min / H, x_max / W, y_max / H
    normalised = (np.asarray(row["box"]) / [width, height, width, height]).tolist()
    assert normalised == [left / width, top / height, last_x / width, last_y / height]


def test_the_mean_mask_baseline_boxes_its_prediction_as_the_rows_are_boxed():
    from medisee.train.evaluate import mean_mask_baseline

    loaded = LoadedImage("k", "ref", "ct", "test", np.zeros((64, 64, 3), np.uint8))
    loaded.targets = [LoadedTarget("liver", square(20, 10, 30, 64, 64), "m")]
    rows = rows_for_image("src", loaded)
    # the mean of one mask, at the image's own size, predicts that mask exactly: its box must match
    metrics = mean_mask_baseline(rows, rows, size=64)
    assert metrics["box_iou"] == pytest.approx(1.0, abs=1e-9)


CLIP_SHAPES = [(512, 333), (333, 512), (4000, 3000), (3000, 4000), (17, 1000), (336, 336), (335, 337)]


@pytest.fixture(scope="module")
def clip_processor():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )


def transformers_resized_hw(processor, height: int, width: int) -> tuple[int, int]:
    """The size CLIPImageProcessor's own resize gives a numpy image of height × width."""
    import torch

    image = np.zeros((height, width, 1), np.uint8)
    resized = processor.resize(torch.from_numpy(image).permute(2, 0, 1), processor.size, processor.resample)
    return tuple(resized.shape[-2:])


def transformers_crop_offset(processor, height: int, width: int) -> tuple[int, int]:
    """(top, left) of CLIPImageProcessor's centre crop of a height × width image, read off an
    image whose every pixel holds its own index."""
    import torch

    index = torch.arange(height * width, dtype=torch.int64).reshape(1, height, width)
    crop = processor.center_crop(index, processor.crop_size)
    assert tuple(crop.shape[-2:]) == (336, 336)
    return divmod(int(crop[0, 0, 0]), width)


@pytest.mark.parametrize(("height", "width"), CLIP_SHAPES)
def test_clip_resize_and_crop_match_clip_image_processor(clip_processor, height, width):
    rh, rw = transformers_resized_hw(clip_processor, height, width)
    assert clip_resized_hw(height, width, 336) == (rh, rw)
    _, top, left = clip_crop(height, width, 336)
    assert (top, left) == transformers_crop_offset(clip_processor, rh, rw)


def test_the_long_side_is_floored():
    assert clip_resized_hw(512, 333, 336) == (516, 336)  # 336 · 512 / 333 = 516.6
    assert clip_resized_hw(333, 512, 336) == (336, 516)


@pytest.mark.parametrize(("height", "width"), [(512, 333), (333, 512), (17, 1000)])
def test_clip_input_is_the_bicubic_resize_cropped_where_clip_image_processor_crops(
    clip_processor, height, width
):
    image = np.random.default_rng(height + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rh, rw = transformers_resized_hw(clip_processor, height, width)
    top, left = transformers_crop_offset(clip_processor, rh, rw)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BICUBIC))
    assert np.array_equal(clip_input(image, 336), resized[top : top + 336, left : left + 336])

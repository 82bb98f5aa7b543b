"""Box-prompt mode: a user's box alone prompts the mask decoder, through the same DecoderStage."""

import numpy as np
import pytest
import torch

from medisee.infer import Predictor
from medisee.infer.results import BadBox
from medisee.model import build_model


@pytest.fixture(scope="module")
def predictor():
    return Predictor(build_model("tiny", seed=0).eval())


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8)


def test_segment_box_returns_a_mask_of_the_image_and_the_box_as_given(predictor, image):
    result = predictor.segment_box(image, [10, 20, 80, 70])
    assert result.mask.shape == (100, 140) and result.mask.dtype == bool
    assert result.box == (10.0, 20.0, 80.0, 70.0) == result.box_unclipped
    assert 0.0 <= result.area_fraction <= 1.0


def test_the_box_prompts_the_decoder_without_the_seg_token(predictor, image):
    """The decoder's sparse prompt holds the box's two corner tokens and nothing else."""
    seen = []
    handle = predictor.model.sam.mask_decoder.transformer.register_forward_hook(
        lambda module, args, out: seen.append(args[2].shape)
    )
    try:
        predictor.segment_box(image, [10, 20, 80, 70])
    finally:
        handle.remove()
    decoder = predictor.model.sam.mask_decoder
    output_tokens = decoder.iou_token.num_embeddings + decoder.mask_tokens.num_embeddings
    assert seen == [torch.Size([1, output_tokens + 2, predictor.model.sam.prompt_encoder.embed_dim])]


def test_boxes_on_several_images_equal_one_at_a_time(predictor, image):
    other = np.random.default_rng(1).integers(0, 255, (64, 48), dtype=np.uint8)
    boxes = [[10, 20, 80, 70], [0, 0, 40, 30], [5, 5, 20, 60]]
    together = predictor.segment_boxes([image, other], [0, 1, 1], boxes)
    alone = [
        predictor.segment_box(image, boxes[0]),
        predictor.segment_box(other, boxes[1]),
        predictor.segment_box(other, boxes[2]),
    ]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.iou_score == pytest.approx(b.iou_score, abs=1e-5)


@pytest.mark.parametrize(
    "box, words",
    [
        ([1, 2, 3], "four finite numbers"),
        ([1, 2, float("nan"), 4], "four finite numbers"),
        (["a", "b", "c", "d"], "four finite numbers"),
        ([[1, 2], [3]], "four finite numbers"),
        ([50, 20, 10, 70], "x1 < x0"),
        ([200, 20, 300, 70], "outside the 140 x 100 image"),
        ([-30, -30, -1, -1], "outside"),
    ],
)
def test_a_box_that_cannot_prompt_is_refused_with_a_reason(predictor, image, box, words):
    with pytest.raises(BadBox, match=words):
        predictor.segment_box(image, box)


def test_queries_and_boxes_together_encode_each_image_once_and_equal_separate_calls(predictor, image):
    from medisee.infer.decoder_stage import DecoderStage

    stage = DecoderStage(predictor.model)
    encoding = predictor.mllm([image], [["Where is the liver?", "Segment the spleen."]])
    candidates = np.stack([e.candidates for e in encoding])
    boxes = np.array([[10, 20, 80, 70], [0, 0, 50, 50]], dtype=np.float64)
    calls = []
    handle = predictor.model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for_queries, for_boxes = stage.decode([image], [0, 0], candidates, [0, 0], boxes)
    finally:
        handle.remove()
    assert len(calls) == 1
    for a, b in zip(for_queries, stage([image], [0, 0], candidates), strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.box == pytest.approx(b.box)
    for a, b in zip(for_boxes, stage.segment_boxes([image], [0, 0], boxes), strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.iou_score == pytest.approx(b.iou_score, abs=1e-5)

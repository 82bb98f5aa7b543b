"""What crosses between processes is the model-sized PreparedImage, and the stages answer the same
from it as from the decoded image."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from medisee.infer import DecoderStage, MLLMStage
from medisee.infer.images import BadImage, PreparedImage, prepare_image
from medisee.model import build_model

GRPC_LIMIT = 4 * 1024 * 1024  # RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH's default


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=0).eval()


def test_stages_answer_the_same_from_the_prepared_image(tiny):
    rng = np.random.default_rng(3)
    images = [
        rng.integers(0, 255, (300, 170, 3), dtype=np.uint8),
        rng.integers(0, 255, (64, 90), dtype=np.uint8),
    ]
    prepared = [prepare_image(im, tiny.clip_size, tiny.sam_size) for im in images]
    queries = [["Segment the liver.", "Where is the spleen?"], ["Segment the left kidney."]]
    mllm = MLLMStage(tiny)
    raw, ready = mllm(images, queries), mllm(prepared, queries)
    for a, b in zip(raw, ready, strict=True):
        np.testing.assert_array_equal(a.candidates, b.candidates)
        np.testing.assert_array_equal(a.similarity, b.similarity)
    candidates = np.stack([e.candidates for e in raw])
    index = [e.image_index for e in raw]
    decoder = DecoderStage(tiny)
    decoded = zip(decoder(images, index, candidates), decoder(prepared, index, candidates), strict=True)
    for q, (a, b) in enumerate(decoded):
        assert a.mask.shape == images[index[q]].shape[:2]
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.box == b.box and a.iou_score == b.iou_score


@pytest.mark.parametrize("shape", [(4096, 3072, 4), (3000, 2500), (6000, 6000, 3)])
def test_the_prepared_form_of_a_large_image_fits_a_grpc_message(shape):
    """The 7B preset's sizes (CLIP 336, SAM 1024): a mammogram-sized image costs what any image does."""
    image = np.zeros(shape, np.uint8)
    prepared = prepare_image(image, 336, 1024)
    assert prepared.shape == shape[:2]
    assert len(pickle.dumps(prepared)) < GRPC_LIMIT < image.nbytes


def test_a_prepared_image_for_another_size_is_refused(tiny):
    prepared = prepare_image(np.zeros((50, 50, 3), np.uint8), tiny.clip_size + 16, tiny.sam_size)
    with pytest.raises(BadImage, match="prepared for CLIP"):
        MLLMStage(tiny)([prepared], [["Segment the liver."]])
    assert isinstance(prepared, PreparedImage)

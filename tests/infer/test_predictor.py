import numpy as np
import pytest
import torch

from medisee.infer import DecoderStage, MLLMStage, Predictor, VerifierStage
from medisee.infer.images import BadImage
from medisee.model import build_model
from medisee.verify.calibrate import CalibratedVerifier
from medisee.verify.decision import Thresholds

QUERIES = [
    "Can you segment and locate the liver in this image?",
    "Please segment and locate the spleen in this image.",
    "Which organ produces bile? Please explain why.",
]


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", seed=0).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 255, (100, 140, 3), dtype=np.uint8),
        rng.integers(0, 255, (64, 64), dtype=np.uint8),
        rng.integers(0, 255, (90, 50, 4), dtype=np.uint8),
    ]


def token_chain_model(chain: list[str]):
    """A tiny model whose greedy answer is `chain` after the prompt: each chain token's embedding is
    made large along its own direction and the LM head maps that direction to the next token, so the
    current token decides the next one while the layers still compute real (position- and
    padding-dependent) states."""
    model = build_model("tiny", seed=1).eval()
    ids = model.text.tokenizer.convert_tokens_to_ids(["[/INST]", *chain])
    embed = model.llava.get_input_embeddings().weight
    head = model.llava.get_output_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.zero_()
        for current, following in zip(ids, ids[1:], strict=False):
            direction = torch.randn(embed.shape[1], generator=generator)
            direction /= direction.norm()
            embed[current] = 30 * direction
            head[following] += 10 * direction
    return model


@pytest.fixture(scope="module")
def answering():
    return token_chain_model(["[SEG]", "and", "[BBOX]", ".", "</s>"])


@pytest.fixture(scope="module")
def not_answering():
    return token_chain_model(["[SEG]", "and", ".", "</s>"])  # never emits [BBOX]


def close(a, b, atol=1e-4):
    return np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=atol)


def test_result_fields(tiny, images):
    results = Predictor(tiny, early_reject=False).predict(images[0], QUERIES)
    assert [r.query for r in results] == QUERIES
    for r in results:
        assert r.found and "[SEG]" in r.answer and r.verdict in ("present", "absent")
        assert r.mask.dtype == bool and r.mask.shape == images[0].shape[:2]
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 <= x2 <= 140 and 0 <= y1 <= y2 <= 100
        assert r.similarity.shape == (8, 8) and r.strength is not None
        assert set(r.timings) == {"mllm_s", "verifier_s", "decoder_s"}


def test_several_queries_equal_one_at_a_time(tiny, images):
    predictor = Predictor(tiny, early_reject=False)
    together = predictor.predict(images[0], QUERIES)
    for query, joint in zip(QUERIES, together, strict=True):
        alone = predictor.predict(images[0], query)[0]
        assert close(joint.box, alone.box) and close(joint.similarity, alone.similarity, atol=1e-3)
        assert (joint.mask != alone.mask).mean() < 1e-3
        assert joint.verdict == alone.verdict


def test_image_encoders_run_once_per_image(tiny, images):
    seen = {"clip": 0, "sam": 0}

    def counter(name):
        def hook(module, args, output):
            seen[name] += args[0].shape[0]

        return hook

    handles = [
        tiny.llava.model.vision_tower.register_forward_hook(counter("clip")),
        tiny.sam.image_encoder.register_forward_hook(counter("sam")),
    ]
    try:
        Predictor(tiny, early_reject=False).predict_batch(images[:2], [QUERIES, QUERIES[:2]])
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"clip": 2, "sam": 2}


def test_batched_generation_equals_one_at_a_time(answering, images):
    stage = MLLMStage(answering, mode="generate", max_new_tokens=8)
    queries = [QUERIES, QUERIES[:1], QUERIES[1:]]  # prompts of different lengths: left padding
    batched = stage(images, queries)
    alone = [stage([images[i]], [[q]])[0] for i, qs in enumerate(queries) for q in qs]
    assert len(batched) == len(alone) == 6
    for b, a in zip(batched, alone, strict=True):
        assert b.found and b.answer == a.answer and b.answer.split() == ["[SEG]", "and", "[BBOX]", "."]
        assert close(b.candidates, a.candidates, atol=1e-3) and close(b.similarity, a.similarity, atol=1e-2)


def test_generated_states_are_those_before_each_candidate_token(answering, images):
    """The [SEG] state of a generated answer equals the teacher-forced state for the same answer."""
    generated = MLLMStage(answering, mode="generate", max_new_tokens=8)(images[:1], [QUERIES[:1]])[0]
    forced = MLLMStage(answering)(images[:1], [QUERIES[:1]])[0]  # the fixed answer is the same text
    assert close(generated.candidates, forced.candidates, atol=1e-3)
    assert close(generated.similarity, forced.similarity, atol=1e-2)


def test_answer_without_tokens_gets_no_mask(not_answering, images):
    results = Predictor(not_answering, mode="generate", max_new_tokens=8).predict(images[0], QUERIES)
    for r in results:
        assert r.answer.split() == ["[SEG]", "and", "."] and not r.found
        assert r.mask is None and r.box is None and r.similarity is None
        assert (r.verdict, r.decided_by) == ("absent", "answer")


def test_stages_in_a_row_equal_predictor(tiny, images):
    calibration = CalibratedVerifier()
    predictor = Predictor(tiny, calibration, early_reject=False)
    expected = predictor.predict_batch(images[:2], [QUERIES, QUERIES[:1]])
    mllm, verifier, decoder = (
        MLLMStage(tiny),
        VerifierStage(calibration, None, tiny.clip_size),
        DecoderStage(tiny),
    )
    encodings = mllm(images[:2], [QUERIES, QUERIES[:1]])
    screenings = verifier.screen(encodings)
    decoded = decoder(
        images[:2], [e.image_index for e in encodings], np.stack([e.candidates for e in encodings])
    )
    flat = [r for per_image in expected for r in per_image]
    for enc, screening, dec, want in zip(encodings, screenings, decoded, flat, strict=True):
        verdict, source = verifier.decide(screening, dec, images[enc.image_index], enc)
        assert (verdict, source) == (want.verdict, want.decided_by)
        assert dec.box == want.box and np.array_equal(dec.mask, want.mask)
        assert np.array_equal(enc.similarity, want.similarity)


def test_early_rejection_skips_the_decoder(tiny, images):
    calls = []
    handle = tiny.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    rejects_all = CalibratedVerifier(thresholds=Thresholds(2.0, 2.0, 2.0))  # every score below: absent
    try:
        results = Predictor(tiny, rejects_all).predict(images[0], QUERIES)
    finally:
        handle.remove()
    assert not calls
    assert all(r.verdict == "absent" and r.decided_by == "rule" and r.mask is None for r in results)


def test_bad_images_are_refused_with_a_reason(tiny):
    predictor = Predictor(tiny)
    with pytest.raises(BadImage, match="uint8"):
        predictor.predict(np.zeros((8, 8), np.float32), "liver")
    with pytest.raises(BadImage, match="shape"):
        predictor.predict(np.zeros((8, 8, 5), np.uint8), "liver")


def test_a_query_judged_absent_after_decoding_keeps_no_mask(tiny, images):
    """Uncertain by the rule, then absent by the fallback: the signals stay, the mask does not."""
    uncertain = Thresholds(0.0, 2.0, 2.0)  # strength always above, the others always below
    always_absent = CalibratedVerifier(thresholds=uncertain, bias=-50.0)
    result = Predictor(tiny, always_absent).predict(images[0], QUERIES[0])[0]
    assert (result.verdict, result.decided_by) == ("absent", "fallback")
    assert result.mask is None and result.box is None and result.mask_score is not None
    kept = Predictor(tiny, always_absent, early_reject=False).predict(images[0], QUERIES[0])[0]
    assert kept.verdict == "absent" and kept.mask is not None


def test_settled_verdicts_are_those_decide_gives():
    """The ingress skips the decision hop for settled queries: the screening alone must give the
    same verdict as the full decision, whatever the decoder said."""
    from medisee.infer.results import Decoded, Screening
    from medisee.infer.verifier_stage import VerifierStage, settled

    stage = VerifierStage(None, None, clip_size=128)
    decoded = Decoded(box=(0, 0, 4, 4), box_unclipped=(0, 0, 4, 4), mask=None, mask_score=0.9,
                      iou_score=0.8, area_fraction=0.1)  # fmt: skip
    screens = [None] + [Screening(0.5, 0.5, 0.9, rule) for rule in ("present", "absent", "uncertain")]
    for screening in screens:
        verdict = settled(screening)
        if screening is not None and screening.rule == "uncertain":
            assert verdict is None
            continue
        assert verdict == stage.decide(screening, decoded) == stage.decide(screening, None)

import numpy as np
import pytest
import torch

from medisee.data.batch import pack_masks
from medisee.data.preprocess import sam_input
from medisee.model import boxes as box_ops
from medisee.model.build import build_model
from medisee.model.heads import Router
from medisee.model.losses import bce_loss, box_loss, dice_loss, similarity_loss


def test_hidden_state_offset_is_the_position_before_each_candidate(tiny):
    seg, bbox = tiny.text.candidate_ids
    input_ids = torch.tensor([[5, 6, 7, seg, 8, bbox, 9], [5, seg, bbox, 6, 7, 8, 9]])
    hidden = torch.arange(7, dtype=torch.float32).view(1, 7, 1).expand(2, 7, 3)
    states, found = tiny.candidate_states(hidden, input_ids)
    assert found.tolist() == [True, True]
    assert states[0, :, 0].tolist() == [2.0, 4.0] and states[1, :, 0].tolist() == [0.0, 1.0]
    missing = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    assert tiny.candidate_states(hidden[:1], missing)[1].tolist() == [False]


def test_similarity_map_is_raw_dot_product_over_image_tokens(tiny):
    n = tiny.text.num_image_tokens
    img = tiny.text.image_token_id
    input_ids = torch.tensor([[1] + [img] * n + [10, 11]])
    hidden = torch.randn(1, n + 3, 6)
    seg = torch.randn(1, 6)
    sims = tiny.similarity_maps(tiny.image_token_states(hidden, input_ids), seg)
    assert torch.allclose(sims[0], hidden[0, 1 : n + 1] @ seg[0])


def test_router_weights_sum_to_one():
    router = Router(16, 3)
    weights = router.weights(torch.randn(5, 3, 16))
    assert torch.allclose(weights.sum(-1), torch.ones(5)) and (weights >= 0).all()


@pytest.mark.parametrize("hw", [(512, 512), (300, 600), (600, 300)])
def test_box_mapping_square_and_non_square(hw):
    h, w = hw
    _, frame = sam_input(np.zeros((h, w, 3), np.uint8), 1024)
    resized = torch.tensor([frame.resized_hw])
    box_px = torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h]])
    norm = box_px / torch.tensor([w, h, w, h])
    in_frame = box_ops.normalized_to_frame(norm, resized)
    expected = box_px * frame.scale
    assert torch.allclose(in_frame, expected, atol=1.0)
    # the whole image maps onto the resized region, never onto the padding
    full = box_ops.normalized_to_frame(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), resized)[0]
    assert full[2] == frame.resized_hw[1] and full[3] == frame.resized_hw[0]
    back = box_ops.normalized_to_original(norm, torch.tensor([[h, w]]))
    assert torch.allclose(back, box_px, atol=1e-3)


def test_dice_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    targets = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    p = torch.sigmoid(logits)
    scale, eps = 1000.0, 1e-6
    num = 2 * (p / scale * targets).sum()
    den = (p / scale).sum() + (targets / scale).sum()
    assert torch.allclose(dice_loss(logits, targets), 1 - (num + eps) / (den + eps))
    perfect = dice_loss(torch.tensor([[50.0, -50.0]]), torch.tensor([[1.0, 0.0]]))
    assert perfect.item() == pytest.approx(0.0, abs=1e-3)


def test_giou_overlapping_disjoint_degenerate():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 3)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    l1, giou = box_loss(a, b)
    # overlap: iou = 1/7, hull 9 -> giou = 1/7 - (9-7)/9
    assert giou[0].item() == pytest.approx(1 - (1 / 7 - 2 / 9), abs=1e-5)
    # disjoint: iou 0, hull 8, union 5 -> giou = -3/8
    assert giou[1].item() == pytest.approx(1 + 3 / 8, abs=1e-5)
    assert giou[2].item() == pytest.approx(0.0, abs=1e-6) and l1[2].item() == 0
    point = box_loss(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]]))[1]
    assert torch.isfinite(point).all()


def test_similarity_loss_is_zero_for_identical_maps_and_positive_otherwise():
    a = torch.randn(2, 64)
    assert similarity_loss(a, a).abs().max() < 1e-5
    assert (similarity_loss(a, torch.randn(2, 64)) > 0).all()


def test_lora_touches_only_the_language_model():
    model = build_model("tiny", finetune="lora")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all("language_model" in n and ("q_proj" in n or "v_proj" in n) for n in lora)
    assert not any(n.startswith("llava.model.vision_tower") for n in trainable)
    assert not any("multi_modal_projector" in n for n in trainable)
    assert not any(n.startswith("sam.image_encoder") or n.startswith("sam.prompt_encoder") for n in trainable)
    for prefix in ("sam.mask_decoder", "text_projection", "box_decoder", "seg_router", "box_router"):
        assert any(n.startswith(prefix) for n in trainable), prefix
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    base_lm = [n for n in trainable if "language_model" in n and "lora_" not in n and "embed_tokens" not in n]
    assert base_lm == []


def test_full_finetune_trains_the_lm_but_not_clip():
    model = build_model("tiny", finetune="full")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("language_model.layers.0.self_attn.k_proj" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)


def test_a_few_steps_on_one_batch_drive_the_loss_down(tmp_path):
    from medisee.config import PrepareConfig
    from medisee.data.batch import collate
    from medisee.data.prepare import prepare
    from medisee.data.reader import Preprocess

    prepare(
        "phantom", "-", str(tmp_path), PrepareConfig(phantom_images=4, val_fraction=0.0), executor="local"
    )
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "train" / "part-00000.parquet").slice(0, 4)
    model = build_model("tiny", finetune="lora", seed=1)
    batch = collate(Preprocess(model.sam_size, model.clip_size)(table), model.text)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    model.train()
    first = None
    for _ in range(25):
        losses = model(batch)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first if first is not None else losses["loss"].item()
    assert losses["loss"].item() < 0.7 * first
    assert losses["box_l1"].item() > 0 and losses["bce"].item() > 0


def test_forward_with_similarity_loss_pairs_reasoning_with_referring():
    from medisee.model.medisee import LossWeights

    model = build_model("tiny", finetune="lora", loss_weights=LossWeights(similarity=3.0))
    rng = np.random.default_rng(0)
    s = model.sam_size
    batch_np = {
        "query": np.array(["Can you segment the liver?", "Which organ produces bile?"], object),
        "answer": np.array(["[SEG] and [BBOX].", "It makes bile. It is [SEG] and [BBOX]."], object),
        "has_target": np.array([True, True]),
        "image_id": np.array(["a", "a"], object),
        "class_name": np.array(["liver", "liver"], object),
        "query_kind": np.array(["referring", "reasoning_short"], object),
        "sam_image": rng.integers(0, 255, (2, s, s, 3), dtype=np.uint8),
        "clip_image": rng.integers(0, 255, (2, model.clip_size, model.clip_size, 3), dtype=np.uint8),
        "mask_bits": pack_masks(np.ones((2, s, s), np.uint8)),
        "box_sam": np.array([[10, 10, 50, 60]] * 2, np.float32),
        "resized_hw": np.array([[s, s]] * 2),
    }
    from medisee.data.batch import collate

    batch = collate(batch_np, model.text)
    assert batch.pair_index.tolist() == [-1, 0] and batch.image_index.tolist() == [0, 0]
    assert batch.clip_image.shape[0] == batch.sam_image.shape[0] == 1  # one image, encoded once
    losses = model(batch)
    assert losses["similarity"].item() > 0
    losses["loss"].backward()


def one_row_batch(model, seed: int = 1):
    from medisee.data.batch import collate

    s, c = model.sam_size, model.clip_size
    rng = np.random.default_rng(seed)
    return collate(
        {
            "query": np.array(["Can you segment and locate the liver in this image?"], object),
            "answer": np.array(["[SEG] and [BBOX]."], object),
            "has_target": np.array([True]),
            "image_id": np.array(["a"], object),
            "class_name": np.array(["liver"], object),
            "query_kind": np.array(["referring"], object),
            "sam_image": rng.integers(0, 255, (1, s, s, 3), dtype=np.uint8),
            "clip_image": rng.integers(0, 255, (1, c, c, 3), dtype=np.uint8),
            "mask_bits": pack_masks((rng.random((1, s, s)) > 0.7).astype(np.uint8)),
            "box_sam": np.array([[10, 10, 50, 60]], np.float32),
            "resized_hw": np.array([[s, s]]),
        },
        model.text,
    )


def box_decoder_grad(model) -> torch.Tensor | None:
    return [m for m in model.box_decoder.modules() if isinstance(m, torch.nn.Linear)][-1].weight.grad


def test_the_mask_loss_reaches_the_box_decoder_through_the_box_prompt():
    """As in the reference, the predicted box enters SAM's prompt encoder without detach."""
    model = build_model("tiny", finetune="full", seed=2)
    losses = model(one_row_batch(model))
    (losses["bce"] + losses["dice"]).backward()
    grad = box_decoder_grad(model)
    assert grad is not None and grad.abs().sum() > 0


def test_with_target_box_prompts_the_mask_loss_is_the_ground_truth_boxs_and_leaves_the_box_head():
    from medisee.model.medisee import LossWeights

    predicted = build_model("tiny", finetune="full", seed=2)
    target = build_model("tiny", finetune="full", seed=2, mask_prompt_box="target")
    predicted.eval(), target.eval()  # no dropout: the by-hand decoding below must see the same states
    batch = one_row_batch(target)
    losses = target(batch)
    (losses["bce"] + losses["dice"]).backward()
    grad = box_decoder_grad(target)
    assert grad is None or grad.abs().sum() == 0
    assert losses["box_l1"].requires_grad  # the box head still learns from its own losses

    # the same mask loss as decoding the ground-truth box by hand
    embeddings = target.image_embeddings(batch.sam_image, batch.image_resized_hw)
    _, prompt_tokens = target.heads(target.candidate_states(*_hidden_and_ids(target, batch))[0])
    low_res, _ = target.decode_masks(embeddings, batch.image_index, batch.box_sam.float(), prompt_tokens)
    logits = target.frame_logits(low_res)
    by_hand = bce_loss(logits, batch.mask).mean()
    assert losses["bce"].item() == pytest.approx(by_hand.item(), rel=1e-4)
    assert predicted(batch)["bce"].item() != pytest.approx(by_hand.item(), rel=1e-4)
    with pytest.raises(ValueError, match="mask_prompt_box"):
        build_model("tiny", mask_prompt_box="given", loss_weights=LossWeights())


def _hidden_and_ids(model, batch):
    features = model.image_features(batch.clip_image)
    out = model.language(batch.input_ids, batch.attention_mask, features, batch.image_index, batch.labels)
    return out.hidden_states[-1], batch.input_ids


@pytest.mark.parametrize("preset", ["tiny"])
def test_image_sizes_come_from_the_preset(preset):
    from medisee.config import PRESET_IMAGE_SIZES, load_config

    model = build_model(preset)
    sizes = PRESET_IMAGE_SIZES[preset]
    assert (model.sam_size, model.clip_size) == (sizes["sam_image_size"], sizes["clip_image_size"])
    cfg = load_config(preset)
    assert (cfg.data.sam_image_size, cfg.data.clip_image_size) == (model.sam_size, model.clip_size)


def test_batched_mask_decoding_equals_sams_own_decoder_per_prompt():
    """One pass over prompts of several images equals segment-anything's MaskDecoder per prompt."""
    model = build_model("tiny", seed=4).eval()
    torch.manual_seed(0)
    g = model.sam.image_encoder.img_size // 8
    embeddings = torch.randn(3, model.sam.prompt_encoder.embed_dim, g, g)
    image_index = torch.tensor([2, 0, 2, 1])
    boxes = torch.tensor([[5.0, 6, 60, 70], [0, 0, 128, 128], [30, 20, 40, 90], [10, 10, 20, 20]])
    prompts = torch.randn(4, model.sam.prompt_encoder.embed_dim)
    with torch.no_grad():
        masks, iou = model.decode_masks(embeddings, image_index, boxes, prompts)
        for row, image in enumerate(image_index.tolist()):
            sparse, dense = model.sam.prompt_encoder(points=None, boxes=boxes[row : row + 1], masks=None)
            want_masks, want_iou = model.sam.mask_decoder(
                image_embeddings=embeddings[image : image + 1],
                image_pe=model.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=torch.cat([sparse, prompts[row : row + 1, None]], 1),
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            assert torch.allclose(masks[row], want_masks[0], atol=1e-5)
            assert torch.allclose(iou[row], want_iou[0], atol=1e-5)


def test_mask_losses_on_a_padded_frame_equal_the_losses_on_the_cropped_image():
    logits, target = torch.randn(2, 16, 16), (torch.rand(2, 16, 16) > 0.6).float()
    resized = torch.tensor([[16, 10], [7, 16]])
    rows, cols = torch.arange(16).view(1, -1, 1), torch.arange(16).view(1, 1, -1)
    valid = (rows < resized[:, :1, None]) & (cols < resized[:, 1:, None])
    for i, (h, w) in enumerate(resized.tolist()):
        crop = (logits[i : i + 1, :h, :w], target[i : i + 1, :h, :w])
        assert torch.allclose(bce_loss(logits, target, valid)[i], bce_loss(*crop)[0], atol=1e-6)
        assert torch.allclose(dice_loss(logits, target, valid=valid)[i], dice_loss(*crop)[0], atol=1e-6)


def test_a_pretrained_mask_decoder_can_stay_frozen():
    model = build_model("tiny", finetune="lora", train_mask_decoder=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("sam.") for n in trainable)
    assert any(n.startswith("box_decoder.") for n in trainable)

"""MediSee: LLaVA emits candidate tokens; routers fuse their states; a box decoder predicts the box;
SAM's mask decoder draws the mask from the box plus the projected [SEG] state.

The module takes and returns tensors (as segment-anything's `modeling/` does); numpy images,
resizing and result assembly live in `medisee.infer` (the stages and the Predictor).

    forward(batch)                          -> losses (training; a medisee.data.batch.TrainingBatch)
    image_features / language / generate    -> the MLLM side (CLIP once per image, then the LM)
    image_embeddings / heads / decode_masks -> the decoder side (SAM once per image)

`llava` or `sam` may be None in a model built for one stage only. In medisee-lite the MLLM's vision
tower is the SAM image encoder itself (`shares_image_encoder`): an image is encoded once, in the SAM
frame, and the LM's image tokens are that embedding pooled (`pooled_vision_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from medisee.data.batch import TrainingBatch
from medisee.model import boxes as box_ops
from medisee.model.heads import BoxDecoder, Router, TextProjection
from medisee.model.losses import bce_loss, box_loss, dice_loss, similarity_loss
from medisee.model.mllm import normalize_clip
from medisee.model.text import TextSpec

SAM_IMAGES_PER_PASS = 2


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


MASK_PROMPT_BOXES = ("predicted", "target")


@dataclass
class LossWeights:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    box: float = 2.0
    similarity: float = 0.0  # > 0 in the fine-tuning stage


@dataclass
class Generated:
    """Greedy generation of a batch: new tokens and, for each, the last-layer state that produced it."""

    tokens: torch.Tensor  # (B, T) long
    states: torch.Tensor  # (B, T, d): states[:, t] is the state before tokens[:, t]
    image_states: torch.Tensor  # (B, N, d) last-layer states at the image positions (prefill)


class MediSee(nn.Module):
    def __init__(
        self,
        llava,
        sam,
        text: TextSpec | None,
        hidden_size: int,
        num_candidates: int,
        prompt_dim: int,
        loss_weights: LossWeights | None = None,
        sam_normalize: str = "sam",
    ):
        super().__init__()
        self.llava = llava
        self.sam = sam
        self.text = text
        self.hidden_size = hidden_size
        self.seg_router = Router(hidden_size, num_candidates)
        self.box_router = Router(hidden_size, num_candidates)
        self.text_projection = TextProjection(hidden_size, prompt_dim)
        self.box_decoder = BoxDecoder(hidden_size)
        self.loss_weights = loss_weights or LossWeights()
        self.sam_normalize = sam_normalize  # see medisee.model.sam.SamConfig.normalize
        self.compute_dtype: torch.dtype | None = None  # None: default_compute_dtype(device)
        self.mask_prompt_box = "predicted"  # in training: the box that prompts the mask decoder
        ids = text.candidate_ids if text is not None else [-1] * num_candidates
        self.register_buffer("candidate_ids", torch.tensor(ids), persistent=False)

    def train(self, mode: bool = True) -> MediSee:
        """Frozen image encoders stay in eval mode: LiteMedSAM's TinyViT has BatchNorm layers, whose
        batch statistics in train mode would change (and overwrite) what the checkpoint holds."""
        super().train(mode)
        for encoder in self.frozen_image_encoders():
            encoder.eval()
        return self

    def frozen_image_encoders(self) -> list[nn.Module]:
        encoders = []
        if self.sam is not None:
            encoders.append(self.sam.image_encoder)
        if self.llava is not None:
            encoders.append(self.llava.model.vision_tower)
        return [e for e in encoders if not any(p.requires_grad for p in e.parameters())]

    @property
    def shares_image_encoder(self) -> bool:
        """medisee-lite: the vision tower pools the SAM image embedding (medisee.model.lite)."""
        from medisee.model.lite import PooledImageEncoder

        return self.llava is not None and isinstance(self.llava.model.vision_tower, PooledImageEncoder)

    @property
    def image_encoder(self) -> nn.Module:
        """SAM's image encoder; in an MLLM-only medisee-lite model, the vision tower's (the same weights)."""
        if self.sam is not None:
            return self.sam.image_encoder
        return self.llava.model.vision_tower.encoder

    # ----- sizes -----------------------------------------------------------------------------
    @property
    def sam_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def clip_size(self) -> int:
        return self.llava.config.vision_config.image_size

    @property
    def grid_side(self) -> int:
        return int(round(self.text.num_image_tokens**0.5))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def autocast(self):
        device = self.device.type
        dtype = self.compute_dtype or default_compute_dtype(device)
        if dtype == torch.float32:
            return torch.autocast(device, enabled=False)
        return torch.autocast(device, dtype=dtype)

    # ----- MLLM side -------------------------------------------------------------------------
    def image_features(
        self, clip_images: torch.Tensor, vision_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(M, C, C, 3) uint8 MLLM-side inputs -> (M, N, d) projected image-token features.

        `vision_tokens`: the frozen tower's output for these images when already known (the
        training cache, medisee.train.embedding_cache); only the projector then runs.
        """
        if vision_tokens is None:
            vision_tokens = self.vision_tokens(clip_images)
        return self.llava.model.multi_modal_projector(vision_tokens)

    def pooled_vision_tokens(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """medisee-lite: (M, P, g, g) SAM-frame image embeddings -> (M, N, P) vision-tower tokens."""
        return self.llava.model.vision_tower.pool(image_embeddings).to(self.llava.dtype)

    def vision_tokens(self, clip_images: torch.Tensor) -> torch.Tensor:
        """(M, C, C, 3) uint8 -> (M, N, v): the vision tower's tokens at LLaVA's feature layer (CLS
        dropped under the "default" strategy), before the projector; what transformers'
        get_image_features selects. Not for a model that shares its image encoder: its tokens come
        from the SAM-frame embedding (`pooled_vision_tokens`)."""
        if self.shares_image_encoder:
            raise ValueError("this model's vision tokens are pooled from its SAM-frame image embedding")
        config = self.llava.config
        pixels = normalize_clip(clip_images)
        out = self.llava.model.vision_tower(
            pixels.to(self.llava.dtype), output_hidden_states=True, return_dict=True
        )
        tokens = out.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            tokens = tokens[:, 1:]
        return tokens

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor, image_index: torch.Tensor):
        """Token embeddings with each row's image features in its image-token positions."""
        embeds = self.llava.get_input_embeddings()(input_ids)
        positions = (input_ids == self.text.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(positions, features[image_index].to(embeds.dtype))

    def language(self, input_ids, attention_mask, features, image_index, labels=None):
        """One LM forward over a batch; every row carries the features of its image (computed once)."""
        return self.llava(
            inputs_embeds=self.embed(input_ids, features, image_index),
            attention_mask=attention_mask,
            labels=labels,
            output_hidden_states=True,
            return_dict=True,
        )

    def generate(
        self,
        features: torch.Tensor,
        image_index: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
    ) -> Generated:
        """Greedy generation for left-padded prompts, in one padded batch.

        The candidate states come from this same pass: the state that produced a token is the last
        position's last-layer state of that step; the image-token states come from the prefill.
        """
        tokenizer = self.text.tokenizer
        out = self.llava.generate(
            inputs_embeds=self.embed(input_ids, features, image_index),
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_hidden_states=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            # each rank generates its own rows; transformers would otherwise sync every step across
            # ranks once it sees FSDP, and ranks with different rows would deadlock
            synced_gpus=False,
        )
        prefill = out.hidden_states[0][-1]
        steps = [prefill[:, -1]] + [h[-1][:, -1] for h in out.hidden_states[1:]]
        tokens = out.sequences[:, -len(steps) :]
        image_positions = input_ids == self.text.image_token_id
        image_states = prefill[image_positions].view(input_ids.shape[0], -1, prefill.shape[-1])
        return Generated(tokens, torch.stack(steps, 1), image_states)

    def candidate_states(
        self, hidden: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States at the position before the first occurrence of each candidate token.

        Returns (B, n, d) and a (B,) bool of rows where every candidate token occurs.
        """
        batch = input_ids.shape[0]
        match = input_ids.unsqueeze(-1) == self.candidate_ids.view(1, 1, -1)  # (B, L, n)
        found = match.any(1)  # (B, n)
        first = match.float().argmax(1)  # (B, n) first position of each token
        before = (first - 1).clamp_min(0)
        states = hidden[torch.arange(batch, device=hidden.device).unsqueeze(-1), before]  # (B, n, d)
        ok = found.all(-1) & (first > 0).all(-1)
        return states, ok

    def image_token_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, N, d) last-layer states at the image-token positions (N consecutive
        positions in every row). A gather from each row's first image position: no host sync."""
        count = self.text.num_image_tokens
        first = (input_ids == self.text.image_token_id).int().argmax(1)  # (B,)
        positions = first.unsqueeze(1) + torch.arange(count, device=input_ids.device)  # (B, N)
        return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    @staticmethod
    def similarity_maps(image_states: torch.Tensor, seg_state: torch.Tensor) -> torch.Tensor:
        """Raw dot product of the [SEG] state with every image-token state (last layer): (B, N)."""
        return torch.einsum("bnd,bd->bn", image_states.float(), seg_state.float())

    # ----- decoder side ----------------------------------------------------------------------
    def image_embeddings(self, sam_images: torch.Tensor, resized_hw: torch.Tensor) -> torch.Tensor:
        """(M, S, S, 3) uint8 padded SAM-frame images -> (M, P, g, g). Padding stays zero after normalising.

        SAM's global-attention blocks hold a full (heads, T, T) score matrix per image (~1.5 GiB at
        1024 px in bf16), so the encoder takes SAM_IMAGES_PER_PASS images at a time.
        """
        x = sam_images.permute(0, 3, 1, 2).float()
        inside = _inside_images(x.shape[-2:], resized_hw).unsqueeze(1)
        if self.sam_normalize == "minmax":
            x = _min_max(x, inside)
        else:
            x = (x - self.sam.pixel_mean) / self.sam.pixel_std  # "sam": a model with SAM's own encoder
        x = x * inside
        chunks = [self.image_encoder(part) for part in x.split(SAM_IMAGES_PER_PASS)]
        # contiguous: the encoder's output is channels-last, and a cached (stacked) embedding is not;
        # in bf16 the mask decoder's convolutions round differently on the two layouts
        return torch.cat(chunks).contiguous()

    def heads(self, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, d) -> normalised xyxy boxes (B, 4) and SAM prompt tokens (B, P)."""
        seg = self.seg_router(candidates)
        box = self.box_router(candidates)
        box_xyxy = box_ops.cxcywh_to_xyxy(self.box_decoder(box.float()))
        return box_xyxy, self.text_projection(seg)

    def decode_masks(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        box_frame: torch.Tensor,
        prompt_tokens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, 1, 4g, 4g) and predicted IoU (B, 1) for B prompts in one batch.

        SAM's MaskDecoder.forward takes one image at a time (it repeats that image's embedding for
        each prompt); here every prompt is paired with its own image's embedding instead, so a batch
        over many images is one transformer pass. Single-mask output, as SAM's multimask_output=False.
        `prompt_tokens` None: the box alone prompts the decoder (MedSAM's interactive mode).
        """
        decoder = self.sam.mask_decoder
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=box_frame, masks=None)
        if prompt_tokens is not None:
            sparse = torch.cat([sparse, prompt_tokens.unsqueeze(1).to(sparse)], 1)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], 0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], 1)
        src = image_embeddings[image_index] + dense
        pos = self.sam.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        b, c, h, w = image_embeddings[image_index].shape
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :]).unsqueeze(1)  # the first mask token
        masks = (hyper @ upscaled.flatten(2)).view(b, 1, *upscaled.shape[-2:])
        return masks, decoder.iou_prediction_head(hs[:, 0, :])[:, :1]

    def frame_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            low_res.float(), (self.sam_size, self.sam_size), mode="bilinear", align_corners=False
        )[:, 0]

    # ----- training ----------------------------------------------------------------------------
    def forward(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """Losses for a TrainingBatch (see medisee.data.batch)."""
        w = self.loss_weights
        with self.autocast():
            batch = self.with_shared_encodings(batch)
            features = self.image_features(batch.clip_image, batch.vision_tokens)
            out = self.language(
                batch.input_ids, batch.attention_mask, features, batch.image_index, batch.labels
            )
            hidden = out.hidden_states[-1]
            candidates, found = self.candidate_states(hidden, batch.input_ids)
            losses = {"ce": out.loss, **self.target_losses(batch, candidates, found)}
            losses["similarity"] = hidden.sum() * 0.0
            if w.similarity > 0:
                losses["similarity"] = self.pair_similarity_loss(batch, hidden, candidates, found)
        losses["loss"] = (
            w.ce * losses["ce"]
            + w.bce * losses["bce"]
            + w.dice * losses["dice"]
            + w.box * (losses["box_l1"] + losses["box_giou"])
            + w.similarity * losses["similarity"]
        )
        return losses

    def with_shared_encodings(self, batch: TrainingBatch) -> TrainingBatch:
        """medisee-lite: the batch's SAM embeddings (computed here unless cached) and, pooled from
        them, its vision tokens; the image encoder runs once for both sides."""
        if not self.shares_image_encoder or batch.vision_tokens is not None:
            return batch
        embeddings = batch.image_embeddings
        if embeddings is None:
            with torch.no_grad():
                embeddings = self.image_embeddings(batch.sam_image, batch.image_resized_hw)
        return replace(
            batch, image_embeddings=embeddings, vision_tokens=self.pooled_vision_tokens(embeddings)
        )

    def target_losses(self, batch: TrainingBatch, candidates, found) -> dict[str, torch.Tensor]:
        """Box L1 + GIoU and mask BCE + Dice for rows with a target whose answer holds the tokens.

        The predicted box enters SAM's prompt encoder without detach, as in the reference: the mask
        loss also trains the box decoder, the box router and the LM through it. With
        `mask_prompt_box = "target"` the ground-truth box prompts the decoder instead (MedSAM's own
        training), and the box head learns from the box losses alone: a pretrained decoder prompted
        by an untrained box head learns to answer background whatever the box, and so does the
        [SEG] token (measured with medisee-lite, docs/benchmarks.md "real_data").
        Every row is decoded and the losses averaged over the rows that count: selecting those rows
        first would make the host wait for the GPU to learn how many there are.

        The mask losses are computed in the SAM frame: the decoder's 256² logits bilinear up to the
        frame, against the label the reader resized into it (nearest, `sam_mask`), padding excluded.
        The reference computes them after SAM's postprocess_masks, at the label's original
        resolution (logits cropped to the image and resized to the label). Kept so, as a batch then
        holds every label at one size. Measured in tests/model/test_mask_loss_resolution.py on the
        real sam_med2d_demo masks: BCE 0.1-1.6 % apart and Dice at most 0.0043 for a soft
        prediction, BCE up to 15 % (0.0012 absolute) and Dice 0.017 for a confident one, ours the
        larger; the gap grows as the image gets smaller than the frame and vanishes at scale 1.
        """
        counted = batch.has_target.bool() & found  # (B,)
        weight = counted.float()
        rows = weight.sum().clamp_min(1.0)
        resized = batch.resized_hw
        box_pred, prompt_tokens = self.heads(candidates)
        box_true = box_ops.frame_to_normalized(batch.box_sam.float(), resized)
        whole_image = torch.cat([box_true.new_zeros(1, 2), box_true.new_ones(1, 2)], -1)  # no host copy
        box_true = torch.where(counted.unsqueeze(-1), box_true, whole_image)
        l1, giou = box_loss(box_pred.float(), box_true)  # rows without a target: a harmless stand-in box
        embeddings = batch.image_embeddings
        if embeddings is None:
            embeddings = self.image_embeddings(batch.sam_image, batch.image_resized_hw)
        prompt_box = box_true if self.mask_prompt_box == "target" else box_pred.float()
        box_frame = box_ops.normalized_to_frame(prompt_box, resized)
        low_res, _ = self.decode_masks(embeddings, batch.image_index, box_frame, prompt_tokens)
        logits = self.frame_logits(low_res)
        valid = _inside_images(logits.shape[-2:], resized)  # the image inside the frame: padding excluded

        def mean(per_row: torch.Tensor) -> torch.Tensor:
            return (per_row * weight).sum() / rows

        return dict(
            bce=mean(bce_loss(logits, batch.mask, valid)),
            dice=mean(dice_loss(logits, batch.mask, valid=valid)),
            box_l1=mean(l1),
            box_giou=mean(giou),
        )

    def pair_similarity_loss(self, batch: TrainingBatch, hidden, candidates, found) -> torch.Tensor:
        """Similarity loss between a reasoning row's map and its referring row's map (same image, class)."""
        pair = batch.pair_index.clamp_min(0)
        weight = ((batch.pair_index >= 0) & found & found[pair]).float()
        sims = self.similarity_maps(self.image_token_states(hidden, batch.input_ids), candidates[:, 0])
        return (similarity_loss(sims, sims[pair]) * weight).sum() / weight.sum().clamp_min(1.0)

    # ----- what is trained ---------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        self.check_trainable_state_dict(state, source)
        self.load_state_dict(state, strict=False)

    def check_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Every trainable parameter present, nothing unknown, shapes equal (global shapes under FSDP)."""
        from medisee.model.checkpoint import CheckpointError

        own = self.state_dict()
        unexpected = [k for k in state if k not in own]
        mismatched = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
        missing = [n for n, p in self.named_parameters() if p.requires_grad and n not in state]
        if unexpected or mismatched or missing:
            raise CheckpointError(
                source,
                missing=missing,
                unexpected=unexpected,
                mismatched=[f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched],
            )


def _min_max(x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Each image's pixels inside its region scaled to [0, 1] by that region's own min and max."""
    big = torch.finfo(x.dtype).max
    low = torch.where(inside, x, big).amin((1, 2, 3), keepdim=True)
    high = torch.where(inside, x, -big).amax((1, 2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-8)


def _inside_images(frame_hw, resized_hw: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool: the top-left resized_hw[b] region of each padded frame."""
    rows = torch.arange(frame_hw[0], device=resized_hw.device).view(1, -1, 1)
    cols = torch.arange(frame_hw[1], device=resized_hw.device).view(1, 1, -1)
    return (rows < resized_hw[:, 0].view(-1, 1, 1)) & (cols < resized_hw[:, 1].view(-1, 1, 1))

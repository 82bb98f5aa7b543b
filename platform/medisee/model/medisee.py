"""MediSee: LLaVA emits candidate tokens; routers fuse their states; a box decoder predicts the box;
SAM's mask decoder draws the mask from the box plus the projected [SEG] state.

Three entry points share one code path:
    forward(batch)                  -> losses (training)
    encode_query(images, queries)   -> candidate states, [SEG]-to-image similarity map, answer text
    decode(images, encoding)        -> boxes and masks
    predict(images, queries)        =  decode(images, encode_query(images, queries))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medisee.data import prompts
from medisee.data.preprocess import clip_input, sam_input
from medisee.model import boxes as box_ops
from medisee.model.heads import BoxDecoder, Router, TextProjection
from medisee.model.losses import bce_loss, box_loss, dice_loss, similarity_loss
from medisee.model.mllm import normalize_clip
from medisee.model.text import TextSpec, answer_with_candidates


@dataclass
class LossWeights:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5
    box: float = 2.0
    similarity: float = 0.0  # > 0 in the fine-tuning stage


@dataclass
class QueryEncoding:
    """What the MLLM stage hands to the decoder stage (small: no image features)."""

    candidates: torch.Tensor  # (B, n, d) last-layer states before each candidate token
    similarity: np.ndarray  # (B, side, side) float32 raw [SEG]·image-token dot products
    answers: list[str]
    found: list[bool]  # whether the answer contained every candidate token


@dataclass
class Prediction:
    answer: str
    box: tuple[float, float, float, float]  # pixel xyxy in the original image
    mask: np.ndarray  # bool H×W of the original image
    similarity: np.ndarray  # side×side float32
    mask_score: float = 0.0  # mean foreground probability inside the mask (a verifier signal)
    iou_score: float = 0.0  # SAM's predicted IoU
    area_fraction: float = 0.0
    extras: dict = field(default_factory=dict)


class MediSee(nn.Module):
    def __init__(self, llava, sam, text: TextSpec, prompt_dim: int, loss_weights: LossWeights | None = None):
        super().__init__()
        self.llava = llava
        self.sam = sam
        self.text = text
        hidden = llava.config.text_config.hidden_size
        n = len(text.candidate_ids)
        self.seg_router = Router(hidden, n)
        self.box_router = Router(hidden, n)
        self.text_projection = TextProjection(hidden, prompt_dim)
        self.box_decoder = BoxDecoder(hidden)
        self.loss_weights = loss_weights or LossWeights()
        self.register_buffer("candidate_ids", torch.tensor(text.candidate_ids), persistent=False)

    # ----- sizes -----------------------------------------------------------------------------
    @property
    def sam_size(self) -> int:
        return self.sam.image_encoder.img_size

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
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # ----- building blocks -------------------------------------------------------------------
    def image_embeddings(self, sam_images: torch.Tensor, resized_hw: torch.Tensor) -> torch.Tensor:
        """(M, S, S, 3) uint8 padded SAM-frame images -> (M, P, g, g). Padding stays zero after normalising."""
        x = sam_images.permute(0, 3, 1, 2).float()
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
        cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
        valid = (rows < resized_hw[:, 0].view(-1, 1, 1)) & (cols < resized_hw[:, 1].view(-1, 1, 1))
        x = x * valid.unsqueeze(1)
        return self.sam.image_encoder(x)

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

    def similarity_maps(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, seg_state: torch.Tensor
    ) -> torch.Tensor:
        """Raw dot product of the [SEG] state with every image-token state (last layer): (B, N)."""
        image_positions = input_ids == self.text.image_token_id  # (B, L), N per row
        image_states = hidden[image_positions].view(input_ids.shape[0], -1, hidden.shape[-1])
        return torch.einsum("bnd,bd->bn", image_states.float(), seg_state.float())

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
        prompt_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, 1, 4g, 4g) and predicted IoU (B, 1); one image embedding serves its targets."""
        out_masks = [None] * box_frame.shape[0]
        out_iou = [None] * box_frame.shape[0]
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        for m in image_index.unique().tolist():
            rows = (image_index == m).nonzero().flatten()
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=box_frame[rows], masks=None)
            sparse = torch.cat([sparse, prompt_tokens[rows].unsqueeze(1).to(sparse)], 1)
            masks, iou = self.sam.mask_decoder(
                image_embeddings=image_embeddings[m : m + 1],
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            for j, r in enumerate(rows.tolist()):
                out_masks[r], out_iou[r] = masks[j], iou[j]
        return torch.stack(out_masks), torch.stack(out_iou)

    def frame_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            low_res.float(), (self.sam_size, self.sam_size), mode="bilinear", align_corners=False
        )[:, 0]

    def run_llava(self, clip_images: torch.Tensor, input_ids, attention_mask, labels=None):
        return self.llava(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=normalize_clip(clip_images),
            labels=labels,
            output_hidden_states=True,
            return_dict=True,
        )

    # ----- training ----------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses for a batch from the reader + tokenizer (see medisee.model.collate)."""
        w = self.loss_weights
        with self.autocast():
            out = self.run_llava(
                batch["clip_image"], batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            hidden = out.hidden_states[-1]
            candidates, found = self.candidate_states(hidden, batch["input_ids"])
            targets = batch["has_target"].bool() & found
            zero = hidden.sum() * 0.0
            losses = {"ce": out.loss if out.loss is not None else zero}
            if targets.any():
                idx = targets.nonzero().flatten()
                box_pred, prompt_tok = self.heads(candidates[idx])
                resized = batch["resized_hw"][idx]
                box_true = box_ops.frame_to_normalized(batch["box_sam"][idx].float(), resized)
                l1, giou = box_loss(box_pred.float(), box_true)
                image_index = batch.get("image_index", torch.arange(len(targets), device=targets.device))
                embeddings = self.image_embeddings(
                    batch["sam_image"],
                    batch["resized_hw"] if "image_index" not in batch else batch["image_resized_hw"],
                )
                box_frame = box_ops.normalized_to_frame(box_pred.detach().float(), resized)
                low_res, _ = self.decode_masks(embeddings, image_index[idx], box_frame, prompt_tok)
                logits = self.frame_logits(low_res)
                bce, dice = [], []
                for j, r in enumerate(idx.tolist()):
                    h, wd = batch["resized_hw"][r].tolist()
                    pred, true = logits[j : j + 1, :h, :wd], batch["mask"][r : r + 1, :h, :wd]
                    bce.append(bce_loss(pred, true))
                    dice.append(dice_loss(pred, true))
                losses["bce"] = torch.cat(bce).mean()
                losses["dice"] = torch.cat(dice).mean()
                losses["box_l1"], losses["box_giou"] = l1.mean(), giou.mean()
            else:
                losses.update(bce=zero, dice=zero, box_l1=zero, box_giou=zero)
            losses["similarity"] = zero
            if w.similarity > 0 and "pair_index" in batch:
                pair = batch["pair_index"]
                rows = ((pair >= 0) & found & found[pair.clamp_min(0)]).nonzero().flatten()
                if rows.numel():
                    sims = self.similarity_maps(hidden, batch["input_ids"], candidates[:, 0])
                    losses["similarity"] = similarity_loss(sims[rows], sims[pair[rows]]).mean()
        losses["loss"] = (
            w.ce * losses["ce"]
            + w.bce * losses["bce"]
            + w.dice * losses["dice"]
            + w.box * (losses["box_l1"] + losses["box_giou"])
            + w.similarity * losses["similarity"]
        )
        return losses

    # ----- inference ---------------------------------------------------------------------------
    def _clip_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack([clip_input(im, self.clip_size) for im in images])).to(self.device)

    @torch.no_grad()
    def encode_query(
        self,
        images: list[np.ndarray],
        queries: list[str],
        mode: str = "teacher_forced",
        max_new_tokens: int = 32,
    ) -> QueryEncoding:
        """MLLM stage. mode: `teacher_forced` (fixed answer, fast) or `generate` (greedy answer text)."""
        clip = self._clip_batch(images)
        tokens = [self.text.tokenizer.convert_ids_to_tokens(i) for i in self.text.candidate_ids]
        if mode == "generate":
            answers = [self._generate(clip[i : i + 1], q, max_new_tokens) for i, q in enumerate(queries)]
        elif mode == "teacher_forced":
            answers = [prompts.FIXED_ANSWER] * len(queries)
        else:
            raise ValueError(f"mode must be teacher_forced or generate, not {mode!r}")
        found_text = [all(t in a for t in tokens) for a in answers]
        forced = [
            a if ok else (a + " " + prompts.FIXED_ANSWER).strip()
            for a, ok in zip(answers, found_text, strict=True)
        ]
        forced = [answer_with_candidates(a, tokens) for a in forced]
        batch = {k: v.to(self.device) for k, v in self.text.batch(queries, forced).items()}
        with self.autocast():
            out = self.run_llava(clip, batch["input_ids"], batch["attention_mask"])
            hidden = out.hidden_states[-1]
            candidates, _ = self.candidate_states(hidden, batch["input_ids"])
            sims = self.similarity_maps(hidden, batch["input_ids"], candidates[:, 0])
        side = self.grid_side
        return QueryEncoding(
            candidates=candidates.float(),
            similarity=sims.float().cpu().numpy().reshape(len(queries), side, side).astype(np.float32),
            answers=answers,
            found=found_text,
        )

    def _generate(self, clip: torch.Tensor, query: str, max_new_tokens: int) -> str:
        ids, _ = self.text.build(query, None)
        input_ids = torch.tensor([ids], device=self.device)
        with self.autocast():
            out = self.llava.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=normalize_clip(clip),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.text.tokenizer.pad_token_id,
                eos_token_id=self.text.tokenizer.eos_token_id,
                # each row generates on its own rank; transformers would otherwise sync every step
                # across ranks once it sees FSDP, and ranks with different rows would deadlock
                synced_gpus=False,
            )
        new = out[0, input_ids.shape[1] :].tolist()
        eos = self.text.tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        return self.text.tokenizer.decode(new, skip_special_tokens=False).strip()

    @torch.no_grad()
    def decode(
        self, images: list[np.ndarray], encoding: QueryEncoding | torch.Tensor, mask_threshold: float = 0.0
    ) -> list[Prediction]:
        """Decoder stage: boxes and masks from candidate states (the MLLM's output)."""
        candidates = encoding.candidates if isinstance(encoding, QueryEncoding) else encoding
        candidates = candidates.to(self.device)
        sam_images, frames = zip(*(sam_input(im, self.sam_size) for im in images), strict=True)
        resized = torch.tensor([f.resized_hw for f in frames], device=self.device)
        with self.autocast():
            embeddings = self.image_embeddings(
                torch.from_numpy(np.stack(sam_images)).to(self.device), resized
            )
            box_norm, prompt_tok = self.heads(candidates)
            box_frame = box_ops.normalized_to_frame(box_norm.float(), resized)
            low_res, iou = self.decode_masks(
                embeddings, torch.arange(len(images), device=self.device), box_frame, prompt_tok
            )
            logits = self.frame_logits(low_res)
        original = torch.tensor([im.shape[:2] for im in images], device=self.device)
        boxes = box_ops.normalized_to_original(box_norm.float(), original).cpu().numpy()
        out = []
        for i, image in enumerate(images):
            h, w = frames[i].resized_hw
            crop = logits[i : i + 1, :h, :w].unsqueeze(0)
            full = F.interpolate(crop, image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            probs = full.sigmoid()
            mask = full > mask_threshold
            out.append(
                Prediction(
                    answer=encoding.answers[i]
                    if isinstance(encoding, QueryEncoding)
                    else prompts.FIXED_ANSWER,
                    box=tuple(float(v) for v in boxes[i]),
                    mask=mask.cpu().numpy(),
                    similarity=encoding.similarity[i]
                    if isinstance(encoding, QueryEncoding)
                    else np.zeros(0, np.float32),
                    mask_score=float(probs[mask].mean()) if mask.any() else 0.0,
                    iou_score=float(iou[i, 0]),
                    area_fraction=float(mask.float().mean()),
                )
            )
        return out

    @torch.no_grad()
    def predict(
        self,
        images: list[np.ndarray],
        queries: list[str],
        mode: str = "teacher_forced",
        max_new_tokens: int = 32,
        mask_threshold: float = 0.0,
    ) -> list[Prediction]:
        """images: uint8 H×W×3 of any size; one query per image."""
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images but {len(queries)} queries")
        images = [_as_rgb_uint8(im) for im in images]
        encoding = self.encode_query(images, queries, mode=mode, max_new_tokens=max_new_tokens)
        return self.decode(images, encoding, mask_threshold=mask_threshold)

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


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, 2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be H×W×3, got {image.shape}")
    return image

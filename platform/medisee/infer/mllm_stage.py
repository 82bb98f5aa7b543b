"""MLLM stage: CLIP once per image, then the LM over every query of the batch in one pass.

Output per query: the answer text, whether it holds the candidate tokens, the states before them
and the [SEG]-to-image similarity map (what the verifier and the decoder stage need). A model that
shares its image encoder (medisee-lite) encodes the SAM frame instead of a CLIP crop; `encode` also
returns those embeddings, for the decoder stage to reuse.
"""

from __future__ import annotations

import numpy as np
import torch

from medisee.data import prompts
from medisee.infer.images import PreparedImage, clip_of, flatten_queries, sam_of
from medisee.infer.results import QueryEncoding

MODES = ("teacher_forced", "generate")


class MLLMStage:
    def __init__(self, model, mode: str = "teacher_forced", max_new_tokens: int = 48):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.model, self.mode, self.max_new_tokens = model, mode, max_new_tokens
        self.candidate_tokens = model.text.tokenizer.convert_ids_to_tokens(list(model.text.candidate_ids))

    def __call__(
        self, images: list[np.ndarray | PreparedImage], queries: list[list[str]], mode: str | None = None
    ) -> list[QueryEncoding]:
        """images[i] with its queries[i]; results in the order of the flattened queries."""
        return self.encode(images, queries, mode)[0]

    @torch.no_grad()
    def encode(
        self, images: list[np.ndarray | PreparedImage], queries: list[list[str]], mode: str | None = None
    ) -> tuple[list[QueryEncoding], torch.Tensor | None]:
        """(the query encodings, each image's SAM embedding when the model shares its image encoder,
        else None)."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        image_index, flat = flatten_queries(queries)
        if not flat:
            return [], None
        model = self.model
        index = torch.tensor(image_index, device=model.device)
        with model.autocast():
            features, embeddings = self._image_features(images)
            if mode == "generate":
                return self._generate(features, index, image_index, flat), embeddings
            return self._teacher_forced(features, index, image_index, flat), embeddings

    def _image_features(self, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.model
        if not model.shares_image_encoder:
            clip = np.stack([clip_of(im, model.clip_size) for im in images])
            return model.image_features(torch.from_numpy(clip).to(model.device)), None
        frames = [sam_of(im, model.sam_size) for im in images]
        pixels = torch.from_numpy(np.stack([f[0] for f in frames])).to(model.device)
        resized = torch.tensor([f[1].resized_hw for f in frames], device=model.device)
        embeddings = model.image_embeddings(pixels, resized)
        return model.image_features(None, model.pooled_vision_tokens(embeddings)), embeddings

    def _teacher_forced(self, features, index, image_index, queries) -> list[QueryEncoding]:
        model = self.model
        batch = model.text.batch(queries, [prompts.FIXED_ANSWER] * len(queries))
        input_ids = batch["input_ids"].to(model.device)
        out = model.language(input_ids, batch["attention_mask"].to(model.device), features, index)
        hidden = out.hidden_states[-1]
        candidates, _ = model.candidate_states(hidden, input_ids)
        sims = model.similarity_maps(model.image_token_states(hidden, input_ids), candidates[:, 0])
        return [
            self._encoding(image_index[i], q, prompts.FIXED_ANSWER, candidates[i], sims[i])
            for i, q in enumerate(queries)
        ]

    def _generate(self, features, index, image_index, queries) -> list[QueryEncoding]:
        model = self.model
        input_ids, attention = left_padded_prompts(model.text, queries)
        generated = model.generate(
            features, index, input_ids.to(model.device), attention.to(model.device), self.max_new_tokens
        )
        eos = model.text.tokenizer.eos_token_id
        out = []
        for i, query in enumerate(queries):
            tokens = generated.tokens[i].tolist()
            tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
            answer = model.text.tokenizer.decode(tokens, skip_special_tokens=False).strip()
            positions = [tokens.index(t) if t in tokens else -1 for t in model.text.candidate_ids]
            if min(positions) < 0:
                out.append(QueryEncoding(image_index[i], query, answer, False, None, None))
                continue
            candidates = generated.states[i, positions]
            sims = model.similarity_maps(generated.image_states[i : i + 1], candidates[:1])[0]
            out.append(self._encoding(image_index[i], query, answer, candidates, sims))
        return out

    def _encoding(self, image_index: int, query: str, answer: str, candidates, sims) -> QueryEncoding:
        side = self.model.grid_side
        return QueryEncoding(
            image_index=image_index,
            query=query,
            answer=answer,
            found=True,
            candidates=candidates.float().cpu().numpy(),
            similarity=sims.float().cpu().numpy().reshape(side, side),
        )


def left_padded_prompts(text, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (no answer) padded on the left, as batched generation needs."""
    prompts_ids = [text.build(q, None)[0] for q in queries]
    length = max(len(p) for p in prompts_ids)
    pad = text.tokenizer.pad_token_id
    input_ids = torch.full((len(prompts_ids), length), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts_ids), length), dtype=torch.long)
    for i, ids in enumerate(prompts_ids):
        input_ids[i, length - len(ids) :] = torch.tensor(ids)
        attention[i, length - len(ids) :] = 1
    return input_ids, attention

"""Image encodings kept per image during training (trainer.image_embedding_cache_gib): the SAM
image embedding (decoder side) and the MLLM vision tower's tokens before the projector (CLIP's).
medisee-lite encodes an image once for both sides: only its LiteMedSAM embedding is kept, and the
model pools its LM tokens from it (`MediSee.with_shared_encodings`, cheap next to the encoder).

Both encoders are frozen and the reader does not augment, so an image's encodings never change:
they are computed the first time a batch holds the image and reused by the image's other queries (a
shard keeps them close together) and in later epochs. This cache, rather than encodings written into
the shards by a Ray Data job, because it needs no second copy of every shard per model and follows
whatever encoder the run's model has; it costs one encoding per image and epoch-one pass. Least
recently used images leave first once the budget is full. Encodings stay on the device in the dtype
they were computed in, so a cached step gives the same losses as an uncached one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch

from medisee.data.batch import TrainingBatch, to_device
from medisee.model.plan import GIB


class ImageEmbeddingCache:
    def __init__(self, budget_gib: float):
        self.budget_bytes = int(budget_gib * GIB)
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # SAM embeddings
        self.tokens: dict[str, torch.Tensor] = {}  # vision-tower tokens of the same images
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def attach(self, module, batch: TrainingBatch) -> TrainingBatch:
        """The batch with `image_embeddings` filled: cached ones reused, the others computed in one pass."""
        missing = [i for i, key in enumerate(batch.image_keys) if key not in self.entries]
        self.hits += len(batch.image_keys) - len(missing)
        self.misses += len(missing)
        with_tokens = module.llava is not None and not module.shares_image_encoder
        computed, computed_tokens = {}, {}
        if missing:
            index = to_device(torch.tensor(missing), batch.sam_image.device)
            with torch.no_grad(), module.autocast():
                fresh = module.image_embeddings(batch.sam_image[index], batch.image_resized_hw[index])
                tokens = module.vision_tokens(batch.clip_image[index]) if with_tokens else None
            computed = {batch.image_keys[i]: fresh[n] for n, i in enumerate(missing)}
            if with_tokens:
                computed_tokens = {batch.image_keys[i]: tokens[n] for n, i in enumerate(missing)}
        rows, token_rows = [], []
        for key in batch.image_keys:
            embedding = computed.get(key)
            if embedding is None:
                embedding = self.entries[key]
                self.entries.move_to_end(key)
            rows.append(embedding)
            if with_tokens:
                token_rows.append(computed_tokens[key] if key in computed_tokens else self.tokens[key])
        for key, embedding in computed.items():
            self._store(key, embedding, computed_tokens.get(key))
        return replace(
            batch,
            image_embeddings=torch.stack(rows),
            vision_tokens=torch.stack(token_rows) if with_tokens else None,
        )

    def _store(self, key: str, embedding: torch.Tensor, tokens: torch.Tensor | None) -> None:
        size = _nbytes(embedding) + (_nbytes(tokens) if tokens is not None else 0)
        if size > self.budget_bytes:
            return
        while self.used_bytes + size > self.budget_bytes:
            oldest_key, oldest = self.entries.popitem(last=False)
            oldest_tokens = self.tokens.pop(oldest_key, None)
            self.used_bytes -= _nbytes(oldest) + (_nbytes(oldest_tokens) if oldest_tokens is not None else 0)
        self.entries[key] = embedding.detach().clone()  # not a view that keeps its whole batch alive
        if tokens is not None:
            self.tokens[key] = tokens.detach().clone()
        self.used_bytes += size

    def stats(self) -> dict[str, float]:
        seen = self.hits + self.misses
        return {
            "image_cache/hit_rate": self.hits / seen if seen else 0.0,
            "image_cache/images": float(len(self.entries)),
            "image_cache/gib": self.used_bytes / GIB,
        }


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

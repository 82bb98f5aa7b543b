"""SAM image embeddings kept per image during training (trainer.image_embedding_cache_gib).

SAM's image encoder is frozen and the reader does not augment, so an image's embedding never changes:
it is computed the first time a batch holds the image and reused by the image's other queries (a
shard keeps them close together) and in later epochs. Least recently used images leave first once
the budget is full. Embeddings stay on the device in the dtype they were computed in, so a cached
step gives the same losses as an uncached one.
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
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0

    def attach(self, module, batch: TrainingBatch) -> TrainingBatch:
        """The batch with `image_embeddings` filled: cached ones reused, the others computed in one pass."""
        missing = [i for i, key in enumerate(batch.image_keys) if key not in self.entries]
        self.hits += len(batch.image_keys) - len(missing)
        self.misses += len(missing)
        computed = {}
        if missing:
            index = to_device(torch.tensor(missing), batch.sam_image.device)
            with torch.no_grad(), module.autocast():
                fresh = module.image_embeddings(batch.sam_image[index], batch.image_resized_hw[index])
            computed = {batch.image_keys[i]: fresh[n] for n, i in enumerate(missing)}
        rows = []
        for key in batch.image_keys:
            embedding = computed.get(key)
            if embedding is None:
                embedding = self.entries[key]
                self.entries.move_to_end(key)
            rows.append(embedding)
        for key, embedding in computed.items():
            self._store(key, embedding)
        return replace(batch, image_embeddings=torch.stack(rows))

    def _store(self, key: str, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if size > self.budget_bytes:
            return
        while self.used_bytes + size > self.budget_bytes:
            _, oldest = self.entries.popitem(last=False)
            self.used_bytes -= oldest.numel() * oldest.element_size()
        self.entries[key] = embedding.detach().clone()  # not a view that keeps its whole batch alive
        self.used_bytes += size

    def stats(self) -> dict[str, float]:
        seen = self.hits + self.misses
        return {
            "image_cache/hit_rate": self.hits / seen if seen else 0.0,
            "image_cache/images": float(len(self.entries)),
            "image_cache/gib": self.used_bytes / GIB,
        }

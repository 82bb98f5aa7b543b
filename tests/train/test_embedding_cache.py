"""The image-encoding cache (SAM embeddings and vision-tower tokens): same losses as computing
them, reuse, and its budget."""

from __future__ import annotations

import pytest
import torch

from medisee.data.batch import collate
from medisee.model import build_model
from medisee.train.embedding_cache import GIB, ImageEmbeddingCache
from tests.train.batches import phantom_rows, reader_batch


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", finetune="lora", seed=0).eval()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return phantom_rows(tmp_path_factory.mktemp("cache"))


def batch_of(model, rows):
    return collate(reader_batch(rows, model.sam_size, model.clip_size), model.text)


def by_image(rows) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["image_id"], []).append(row)
    return grouped


def test_cached_embeddings_give_the_same_losses(model, rows):
    images = list(by_image(rows).values())
    first = batch_of(model, images[0][:2] + images[1][:2])
    second = batch_of(model, images[0][2:4] + images[2][:2])  # image 0 again, with other queries
    cache = ImageEmbeddingCache(1.0)
    with torch.no_grad():
        for batch in (first, second):
            cached = model(cache.attach(model, batch))
            computed = model(batch)
            for key, value in computed.items():
                assert torch.allclose(cached[key], value, atol=1e-6), key
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.stats()["image_cache/hit_rate"] == pytest.approx(0.25)
    again = cache.attach(model, second)
    assert torch.equal(cache.entries[second.image_keys[0]], again.image_embeddings[0])
    assert torch.equal(cache.tokens[second.image_keys[0]], again.vision_tokens[0])
    assert torch.equal(again.vision_tokens, model.vision_tokens(second.clip_image))


def test_the_least_recently_used_image_leaves_when_the_budget_is_full(model, rows):
    images = list(by_image(rows).values())
    one = batch_of(model, images[0][:1])
    attached = ImageEmbeddingCache(1.0).attach(model, one)
    embedding, tokens = attached.image_embeddings[0], attached.vision_tokens[0]
    entry_gib = (embedding.numel() * embedding.element_size() + tokens.numel() * tokens.element_size()) / GIB
    cache = ImageEmbeddingCache(2.5 * entry_gib)  # room for two images
    keys = []
    for rows_of_image in images[:2]:
        batch = batch_of(model, rows_of_image[:1])
        cache.attach(model, batch)
        keys.append(batch.image_keys[0])
    cache.attach(model, batch_of(model, images[0][:1]))  # image 0 used again: image 1 is now the oldest
    third = batch_of(model, images[2][:1])
    cache.attach(model, third)
    assert list(cache.entries) == [keys[0], third.image_keys[0]]
    assert sorted(cache.tokens) == sorted(cache.entries)
    assert cache.used_bytes <= cache.budget_bytes
    too_small = ImageEmbeddingCache(0.5 * entry_gib)
    assert too_small.attach(model, one).image_embeddings is not None and not too_small.entries


def test_an_fsdp_run_cannot_ask_for_the_cache():
    from medisee.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="image_embedding_cache_gib"):
        load_config("tiny", ["trainer.strategy=fsdp", "trainer.image_embedding_cache_gib=1"])

"""The official release's rows for the tokens it added ([SEG], [BBOX], appended to the base vocabulary
in that order, no `<image>` entry) land on our ids for those tokens, whatever else our tokenizer adds."""

import pytest
import torch

from medisee.model import build_model
from medisee.model.checkpoint import CheckpointError, load_official_release, release_token_rows, write_torch
from tests.model.test_checkpoints import official_layout

BASE, WIDTH = 10, 6
OURS = {"[SEG]": 11, "[BBOX]": 12}  # our tokenizer adds <image> at 10 first


def test_each_added_tokens_row_moves_to_our_id_for_it():
    gen = torch.Generator().manual_seed(0)
    release = torch.randn(BASE + 2, WIDTH, generator=gen)  # [SEG] at 10, [BBOX] at 11
    own = torch.randn(BASE + 3, WIDTH, generator=gen)
    rows = release_token_rows(release, own, OURS, "embed")
    assert torch.equal(rows[:BASE], release[:BASE])
    assert torch.equal(rows[OURS["[SEG]"]], release[BASE]) and torch.equal(
        rows[OURS["[BBOX]"]], release[BASE + 1]
    )
    assert torch.equal(rows[BASE], own[BASE])  # our <image> row: the release has none
    # the logit of [SEG] for any hidden state is the release's, computed from its own matrix
    hidden = torch.randn(4, WIDTH, generator=gen)
    assert torch.allclose((hidden @ rows.T)[:, OURS["[SEG]"]], hidden @ release[BASE])


def test_a_release_of_another_base_vocabulary_is_refused():
    release, own = torch.zeros(BASE + 6, WIDTH), torch.zeros(BASE + 3, WIDTH)
    with pytest.raises(CheckpointError, match=r"lm_head.*14 base-vocabulary rows.*\[11, 12\]"):
        release_token_rows(release, own, OURS, "lm_head")


def test_the_loaded_models_seg_logits_are_the_releases(tmp_path):
    source = build_model("tiny", seed=3).eval()
    release = official_layout(source, lora=False)
    gen = torch.Generator().manual_seed(2)
    base = release["lm_head.weight"].shape[0] - 2  # the release's layout: [SEG], [BBOX] last
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        release[key] = release[key].clone()
        release[key][base:] = torch.randn(2, release[key].shape[1], generator=gen)  # distinctive rows
    write_torch(release, str(tmp_path / "release.pth"))

    loaded = build_model("tiny", seed=4).eval()
    load_official_release(loaded, str(tmp_path / "release.pth"))
    seg, bbox = loaded.text.tokenizer.convert_tokens_to_ids(["[SEG]", "[BBOX]"])
    embed = loaded.llava.get_input_embeddings().weight
    assert torch.equal(embed[seg], release["model.embed_tokens.weight"][base])
    assert torch.equal(embed[bbox], release["model.embed_tokens.weight"][base + 1])
    ids = torch.tensor([[1, 7, 20, seg, 33]])
    with torch.no_grad():
        out = loaded.llava.model.language_model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        logits = loaded.llava.lm_head(hidden)
    expected = hidden @ release["lm_head.weight"][base]  # the release's [SEG] row, from its own file
    assert torch.allclose(logits[..., seg], expected, atol=1e-5)

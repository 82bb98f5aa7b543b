"""The official release's rows for the tokens it added ([SEG], [BBOX], appended to its base vocabulary
in that order, no `<image>` entry) land on our ids for those tokens, whatever else our tokenizer adds.

The release here is a state dict in the reference's names and shapes on a small base vocabulary that,
like the release's, has no `<image>`: our tokenizer adds `<image>` first, so our [SEG] and [BBOX] sit
one row later than the release's, and a load that copied rows by position would be off by one.
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from medisee.model import build_model
from medisee.model.checkpoint import (
    CheckpointError,
    convert_official_file,
    load_official_release,
    release_token_rows,
    write_torch,
)
from tests.model.test_checkpoints import official_layout

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "it", "is", "and", "sure", "."]
V = len(WORDS)  # the base vocabulary, shared by the release and us
RELEASE_SEG, RELEASE_BBOX = V, V + 1  # the reference's add_tokens("[SEG]"), add_tokens("[BBOX]")
ROW_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
LM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


def base_tokenizer():
    """A word-level tokenizer of V tokens with no `<image>` (as the release's base has none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def our_model(seed: int):
    return build_model("tiny", tokenizer=base_tokenizer(), seed=seed).eval()


def release_layout(seed: int = 3) -> dict[str, torch.Tensor]:
    """A whole release: the reference's names, and V + 2 rows in embed_tokens / lm_head whose last two
    ([SEG], [BBOX]) are distinctive."""
    state = official_layout(our_model(seed), lora=False)
    gen = torch.Generator().manual_seed(seed)
    for key in ROW_KEYS:
        width = state[key].shape[1]
        state[key] = torch.cat([state[key][:V], 5 + torch.randn(2, width, generator=gen)])
    return state


def release_lm(state: dict[str, torch.Tensor], text_config) -> LlamaForCausalLM:
    """The release's language model on its own: its LM keys loaded strictly, its own vocabulary size."""
    config = text_config.__class__(**{**text_config.to_dict(), "vocab_size": V + 2})
    lm = LlamaForCausalLM(config).eval()
    lm.load_state_dict({k: v for k, v in state.items() if k.startswith(LM_PREFIXES)}, strict=True)
    return lm


def our_ids(model) -> dict[str, int]:
    tokens = ["<image>", "[SEG]", "[BBOX]"]
    return dict(zip(tokens, model.text.tokenizer.convert_tokens_to_ids(tokens), strict=True))


def test_our_tokenizer_adds_image_before_the_releases_tokens():
    ids = our_ids(our_model(0))
    assert ids == {"<image>": V, "[SEG]": V + 1, "[BBOX]": V + 2}  # release: [SEG] V, [BBOX] V + 1


def test_each_added_tokens_row_moves_to_our_id_for_it():
    gen = torch.Generator().manual_seed(0)
    release = torch.randn(V + 2, 6, generator=gen)
    own = torch.randn(V + 3, 6, generator=gen)
    rows = release_token_rows(release, own, {"[SEG]": V + 1, "[BBOX]": V + 2}, V, "embed")
    assert torch.equal(rows[:V], release[:V])
    assert torch.equal(rows[V + 1], release[RELEASE_SEG]) and torch.equal(rows[V + 2], release[RELEASE_BBOX])
    assert torch.equal(rows[V], own[V])  # our <image> row: the release has none


def our_rows(model) -> dict[str, torch.Tensor]:
    """Our embed_tokens / lm_head matrices under the release's key names."""
    return {
        "model.embed_tokens.weight": model.llava.get_input_embeddings().weight,
        "lm_head.weight": model.llava.lm_head.weight,
    }


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(release state, our rows before loading, our model with the release loaded from a file)."""
    path = tmp_path_factory.mktemp("release") / "release.pth"
    release = release_layout()
    write_torch(release, str(path))
    model = our_model(seed=4)
    fresh = {key: rows.detach().clone() for key, rows in our_rows(model).items()}
    load_official_release(model, str(path))
    return release, fresh, model


def test_every_added_tokens_rows_are_the_releases(loaded):
    release, fresh, model = loaded
    ids = our_ids(model)
    for key, rows in our_rows(model).items():
        assert rows.shape[0] == V + 3
        assert torch.equal(rows[:V], release[key][:V]), key
        assert torch.equal(rows[ids["[SEG]"]], release[key][RELEASE_SEG]), key
        assert torch.equal(rows[ids["[BBOX]"]], release[key][RELEASE_BBOX]), key
        assert torch.equal(rows[ids["<image>"]], fresh[key][ids["<image>"]]), (
            key
        )  # kept as our builder made it


def test_the_loaded_models_seg_logits_are_the_releases(loaded):
    release, _, model = loaded
    ids = our_ids(model)
    words = [1, 6, 7, RELEASE_SEG, 8, RELEASE_BBOX, 10]  # "<s> it is [SEG] and [BBOX] ."
    ours = [{RELEASE_SEG: ids["[SEG]"], RELEASE_BBOX: ids["[BBOX]"]}.get(t, t) for t in words]
    lm = release_lm(release, model.llava.config.text_config)
    with torch.no_grad():
        expected = lm(input_ids=torch.tensor([words])).logits
        hidden = model.llava.model.language_model(input_ids=torch.tensor([ours])).last_hidden_state
        logits = model.llava.lm_head(hidden)
    for release_id, our_id in ((RELEASE_SEG, ids["[SEG]"]), (RELEASE_BBOX, ids["[BBOX]"])):
        torch.testing.assert_close(logits[..., our_id], expected[..., release_id])
    torch.testing.assert_close(logits[..., :V], expected[..., :V])
    # and by hand: the hidden state at every position times the release's [SEG] row
    torch.testing.assert_close(logits[..., ids["[SEG]"]], hidden @ release["lm_head.weight"][RELEASE_SEG])


def test_a_converted_file_maps_the_same_rows(loaded, tmp_path):
    release, _, direct = loaded
    write_torch(release, str(tmp_path / "release.pth"))
    convert_official_file(str(tmp_path / "release.pth"), str(tmp_path / "converted.pth"))
    model = our_model(seed=4)  # the same fresh <image> row as `loaded`
    load_official_release(model, str(tmp_path / "converted.pth"))
    for key, rows in our_rows(model).items():
        torch.testing.assert_close(rows, our_rows(direct)[key], rtol=0, atol=0)


@pytest.mark.parametrize("base", [V - 1, V + 1])
def test_a_release_of_another_base_vocabulary_is_refused(tmp_path, base):
    release = release_layout()
    for key in ROW_KEYS:
        release[key] = torch.randn(base + 2, release[key].shape[1])
    write_torch(release, str(tmp_path / "release.pth"))
    shapes = rf"embed_tokens\.weight.*: \({base + 2}, \d+\) vs \({V + 3}, \d+\)"
    sizes = rf"has {base} tokens, our base tokenizer {V}"
    with pytest.raises(CheckpointError, match=rf"release\.pth.*{shapes}.*{sizes}"):
        load_official_release(our_model(seed=4), str(tmp_path / "release.pth"))

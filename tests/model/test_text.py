"""The tiny preset's vocabulary is fixed data: template edits cannot change checkpoint shapes."""

from medisee.data import prompts
from medisee.model.text import build_tiny_tokenizer, tiny_vocabulary, vocabulary_from_text

REGENERATE = (
    "regenerate it with `.venv/bin/python -c 'from medisee.model.text import write_tiny_vocabulary; "
    "write_tiny_vocabulary()'`. NOTE: adding words changes the tiny preset's embedding size, so tiny "
    "checkpoints saved before no longer load (retrain them, or keep the new text within the vocabulary)."
)


def test_every_template_and_phantom_word_is_in_the_vocabulary_file():
    vocab = set(tiny_vocabulary())
    missing = [w for w in vocabulary_from_text() if w not in vocab]
    assert not missing, f"words missing from platform/medisee/model/tiny_vocab.txt: {missing}; {REGENERATE}"


def test_vocabulary_file_is_sorted_and_unique():
    words = tiny_vocabulary()
    assert words == sorted(set(words)) and all(w == w.strip().lower() and w for w in words)


def test_template_edits_do_not_change_the_tokenizer_size(monkeypatch):
    before = len(build_tiny_tokenizer())
    monkeypatch.setattr(prompts, "REFERRING_QUERIES", ("Outline the {name} with zygomorphic flourish.",))
    monkeypatch.setattr(prompts, "ANSWERS", ("Behold [SEG] and [BBOX] quixotically.",))
    assert "zygomorphic" in vocabulary_from_text()  # the recomputed list sees the edit ...
    assert len(build_tiny_tokenizer()) == before  # ... the tokenizer does not


def test_tiny_tokenizer_knows_the_template_words():
    tok = build_tiny_tokenizer()
    question, answer = prompts.reasoning("Which organ produces bile?", "The liver makes bile.", "k")
    for text in (prompts.referring("liver", "k")[0], question):
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text

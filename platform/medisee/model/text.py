"""Tokenizer set-up, the conversation template and tokenisation with answer-only targets.

Template (Mistral-instruct, as the reference code uses):  `[INST] <image>\n{question} [/INST] {answer}`
The single `<image>` placeholder is expanded to one token per image patch, which is what
transformers' LLaVA expects in `input_ids`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from medisee.data.prompts import IMAGE_TOKEN, reserved_tokens

IGNORE_INDEX = -100


def candidate_tokens(n: int) -> list[str]:
    """[SEG], [BBOX], then [CAND2], [CAND3], ... for n > 2."""
    base = ["[SEG]", "[BBOX]"]
    return base[:n] + [f"[CAND{i}]" for i in range(2, n)]


TEMPLATES = ("mistral", "chatml")


def prompt_text(question: str, template: str = "mistral") -> str:
    """The prompt before the answer: Mistral-instruct (the reference's), or ChatML (SmolLM2's own
    chat template, medisee-lite), each with the one `<image>` placeholder before the question."""
    if reserved := reserved_tokens(question):
        raise ValueError(f"the query holds the template's reserved token {reserved[0]!r}")
    if template == "chatml":
        return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question.strip()}<|im_end|>\n<|im_start|>assistant\n"
    if template != "mistral":
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, not {template!r}")
    return f"[INST] {IMAGE_TOKEN}\n{question.strip()} [/INST]"


@dataclass
class TextSpec:
    tokenizer: object
    image_token_id: int
    candidate_ids: list[int]
    num_image_tokens: int
    template: str = "mistral"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build(self, question: str, answer: str | None) -> tuple[list[int], list[int]]:
        """input_ids and labels (answer tokens only) for one conversation; answer None -> prompt only."""
        tok = self.tokenizer
        prompt = self.encode(prompt_text(question, self.template))
        expanded: list[int] = []
        for token in prompt:
            expanded.extend([token] * self.num_image_tokens if token == self.image_token_id else [token])
        chatml = self.template == "chatml"  # starts with its own <|im_start|>; the answer follows a newline
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None and not chatml else []) + expanded
        labels = [IGNORE_INDEX] * len(ids)
        if answer is not None:
            answer_ids = self.encode(answer.strip() if chatml else " " + answer.strip()) + [tok.eos_token_id]
            ids += answer_ids
            labels += answer_ids
        return ids, labels

    def batch(self, questions: list[str], answers: list[str | None]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask, labels."""
        pairs = [self.build(q, a) for q, a in zip(questions, answers, strict=True)]
        length = max(len(ids) for ids, _ in pairs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(pairs), length), pad, dtype=torch.long)
        labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(pairs), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(pairs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


# The tiny preset's vocabulary is fixed data (tiny_vocab.txt) so that editing a template sentence does
# not change the embedding size of saved tiny checkpoints. `vocabulary_from_text` recomputes the words
# of the current templates and phantom text; a test checks they are all in the file.
TINY_VOCAB_FILE = "tiny_vocab.txt"
WORD_PATTERN = r"\w+|[^\w\s]"
EXTRA_TEXT = (
    "It is the leftmost structure. It is the rightmost structure. It is the largest structure in the slice.",
    "It is the smallest structure in the slice. Which labelled structure lies furthest to the left right of",
    "the image? Which structure takes up the largest area in this slice? Which structure is the smallest one",
    "heart lung lobe upper lower middle left right vena cava inferior kidney bladder prostate rib hip femur",
    "vertebrae colon duodenum esophagus trachea brain tumour tumor lesion cyst nodule polyp ventricle atrium",
    "myocardium gluteus maximus autochthon muscle bone vessel artery vein and or no not yes is are a an",
)


def template_texts() -> list[str]:
    """Every template sentence, phantom organ text and extra medical word the tiny preset must know."""
    from medisee.data import phantom, prompts

    texts = [
        *prompts.REFERRING_QUERIES,
        *prompts.ANSWERS,
        *prompts.REASONING_SUFFIXES,
        *prompts.REASONING_ANSWERS,
        prompts.FALSE_ANSWER,
        prompts.FIXED_ANSWER,
        *EXTRA_TEXT,
    ]
    for organ in phantom.ORGANS:
        texts += [organ.name, organ.short, organ.long, organ.explanation]
    return texts


def vocabulary_from_text(texts: list[str] | None = None) -> list[str]:
    """The sorted lower-cased words and punctuation of `texts` (default: `template_texts()`)."""
    words = set()
    for text in template_texts() if texts is None else texts:
        words.update(re.findall(WORD_PATTERN, text.lower()))
    return sorted(words)


def tiny_vocabulary() -> list[str]:
    """The tiny preset's word list, read from the packaged tiny_vocab.txt (one token a line, sorted)."""
    text = resources.files("medisee.model").joinpath(TINY_VOCAB_FILE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def write_tiny_vocabulary(path: str | Path | None = None) -> Path:
    """Regenerate tiny_vocab.txt: the current file plus every word of `template_texts()`.

    Adding words changes the tiny preset's embedding size: tiny checkpoints saved before no longer load.
    """
    target = Path(path) if path else Path(str(resources.files("medisee.model").joinpath(TINY_VOCAB_FILE)))
    words = set(vocabulary_from_text())
    if target.exists():
        words.update(line for line in target.read_text(encoding="utf-8").splitlines() if line)
    target.write_text("".join(f"{w}\n" for w in sorted(words)), encoding="utf-8")
    return target


def build_tiny_tokenizer():
    """A word-level fast tokenizer built locally (no hub)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, "[INST]", "[/INST]"]
    vocab = {tok: i for i, tok in enumerate(specials + tiny_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"\[/?INST\]|<image>|\w+|[^\w\s]"), "isolated"),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, "[INST]", "[/INST]"]})
    return tok


def add_candidate_tokens(tokenizer, n: int) -> list[int]:
    """Add the candidate tokens (and <image> if missing) as special tokens; return their ids."""
    tokens = candidate_tokens(n)
    existing = list(getattr(tokenizer, "additional_special_tokens", []) or [])
    wanted = [t for t in [IMAGE_TOKEN, *tokens] if t not in existing]
    if wanted:
        tokenizer.add_special_tokens({"additional_special_tokens": existing + wanted})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(tokens)

"""Query and answer templates, as the MediSee reference code writes them (`utils/utils.py`).

Referring rows (SA-Med2D-20M style) ask for a class by name; reasoning rows (MLMR-SD style) append
one of six request suffixes to the query, and their answers put the candidate tokens first and the
explanation after. Choices are made by hashing the record id so a conversion is reproducible.
As in the reference's training datasets, class names, reasoning queries and explanations are
lower-cased; evaluation rows (val/test splits) follow its validation datasets instead: referring
rows ask one fixed question with the class name as written and take the fixed answer, reasoning
rows end with one fixed suffix and keep the query as written.
`TEMPLATE_VERSION` names this set of sentences; model artifacts record it.
"""

from __future__ import annotations

import hashlib
import re

TEMPLATE_VERSION = "medisee-ref-2"

SEG_TOKEN = "[SEG]"
BBOX_TOKEN = "[BBOX]"
CANDIDATE_TOKENS = (SEG_TOKEN, BBOX_TOKEN)
IMAGE_TOKEN = "<image>"
# Text the conversation template gives a meaning: in a user's query it would add an image placeholder
# or a candidate token to the prompt (the model then fails, or reads the wrong hidden states).
RESERVED_TEXT = re.compile(r"<image>|\[/?INST\]|<\|im_(?:start|end)\|>|\[SEG\]|\[BBOX\]|\[CAND\d+\]")


def reserved_tokens(text: str) -> list[str]:
    """The template's reserved tokens that `text` holds, in order of first appearance."""
    return list(dict.fromkeys(RESERVED_TEXT.findall(text)))


REFERRING_QUERIES = (
    "Can you segment and locate the {name} in this image?",
    "Please segment and locate the {name} in this image.",
    "What is {name} in this image? Please respond with segmentation mask and location bounding box.",
    "What is {name} in this image? Please output segmentation mask and location bounding box.",
)
# The reference's validation referring dataset asks every class with this one question.
EVAL_REFERRING_QUERY = REFERRING_QUERIES[1]

ANSWERS = (
    "It is [SEG] and [BBOX].",
    "Sure, [SEG] and [BBOX].",
    "Sure, it is [SEG] and [BBOX].",
    "Sure, the segmentation and bounding box result is [SEG] and [BBOX].",
    "[SEG] and [BBOX].",
)

REASONING_SUFFIXES = (
    "Please respond with segmentation mask and location bounding box, and explain the reason.",
    "Please output segmentation mask and location bounding box, and explain the reason.",
    "Please output segmentation mask and location bounding box, and explain why.",
    "Please respond with segmentation mask and location bounding box, and explain why.",
    "Please respond with segmentation mask and location bounding box, and give some explanation.",
    "Please output segmentation mask and location bounding box, and give some explanation.",
)
# The reference's validation dataset ends every reasoning query with this one suffix.
EVAL_REASONING_SUFFIX = REASONING_SUFFIXES[2]

REASONING_ANSWERS = (
    "It is [SEG] and [BBOX]. {explanation}.",
    "Sure, [SEG] and [BBOX]. {explanation}",
    "Sure, it is [SEG] and [BBOX]. {explanation}",
    "Sure, the segmentation and bounding box result is [SEG] and [BBOX]. {explanation}",
    "[SEG] and [BBOX]. {explanation}",
)

FALSE_ANSWER = "There is no {name} in this image."

# The fixed answer used for teacher-forced, segmentation-only scoring (as the reference evaluates).
FIXED_ANSWER = "[SEG] and [BBOX]."


# Splits whose rows take the evaluation forms.
EVAL_SPLITS = ("val", "test")


def is_eval_split(split: str) -> bool:
    return split in EVAL_SPLITS


def class_text(name: str) -> str:
    """`inferior_vena_cava` → `inferior vena cava`."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def _asked_name(name: str) -> str:
    """The class name as a question writes it: spaced and lower-cased (`Liver` → `liver`)."""
    return class_text(name).lower()


def pick(options, key: str):
    """Deterministic choice from `options` keyed by a string."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return options[int.from_bytes(digest, "little") % len(options)]


def _referring_question(name: str, key: str, for_eval: bool) -> str:
    if for_eval:
        return EVAL_REFERRING_QUERY.format(name=class_text(name))
    return pick(REFERRING_QUERIES, key + "/q").format(name=_asked_name(name))


def referring(name: str, key: str, for_eval: bool = False) -> tuple[str, str]:
    """(question, answer) of a referring row.

    `for_eval` (val/test rows) asks the reference's validation question with the class name's case
    kept and answers with `FIXED_ANSWER`; training rows draw a question and an answer.
    """
    answer = FIXED_ANSWER if for_eval else pick(ANSWERS, key + "/a")
    return _referring_question(name, key, for_eval), answer


def _reasoning_question(query: str, key: str, for_eval: bool) -> str:
    if for_eval:
        return f"{query.strip()} {EVAL_REASONING_SUFFIX}"
    return f"{query.strip().lower()} {pick(REASONING_SUFFIXES, key + '/s')}"


def reasoning(query: str, explanation: str | None, key: str, for_eval: bool = False) -> tuple[str, str]:
    """(question, answer) of a reasoning row: the query plus a request suffix; tokens, then the explanation.

    `for_eval` (val/test rows) uses the fixed validation suffix and keeps the text's case, as the
    reference's validation dataset does; training rows are lower-cased like its training dataset.
    """
    question = _reasoning_question(query, key, for_eval)
    if not explanation or not explanation.strip():
        return question, pick(ANSWERS, key + "/a")
    explanation = explanation.strip() if for_eval else explanation.strip().lower()
    answer = pick(REASONING_ANSWERS, key + "/a").format(explanation=explanation)
    # the first form adds a full stop of its own: do not double the explanation's
    return question, answer[:-1] if answer.endswith("..") else answer


def false_query(name: str, key: str, for_eval: bool = False) -> tuple[str, str]:
    """(question, answer) of a false-premise row: a referring question about an absent class.

    `for_eval` asks it as `referring` does for val/test rows (the reference has no false rows there).
    """
    asked = class_text(name) if for_eval else _asked_name(name)
    return _referring_question(name, key, for_eval), FALSE_ANSWER.format(name=asked)

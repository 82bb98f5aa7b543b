"""Query and answer templates.

Referring queries follow the form the MediSee reference code uses for SA-Med2D-20M
(a short request naming the class); answers carry the candidate tokens. Choices are
made by hashing the record id so a conversion is reproducible.
"""

from __future__ import annotations

import hashlib

SEG_TOKEN = "[SEG]"
BBOX_TOKEN = "[BBOX]"
CANDIDATE_TOKENS = (SEG_TOKEN, BBOX_TOKEN)

REFERRING_QUERIES = (
    "Can you segment the {name} in this image?",
    "Please segment the {name} in this image.",
    "What is the {name} in this image? Please respond with a segmentation mask and a box.",
    "Where is the {name} in this image? Please output its mask and bounding box.",
    "Could you locate and segment the {name} in this image?",
)

ANSWERS = (
    "Sure, it is [SEG] and [BBOX].",
    "[SEG] and [BBOX].",
    "Sure, the segmentation result is [SEG] and [BBOX].",
    "It is [SEG] and [BBOX].",
)

REASONING_ANSWER = "{explanation} It is [SEG] and [BBOX]."
FALSE_ANSWER = "There is no {name} in this image."

# The fixed answer used for teacher-forced, segmentation-only scoring.
FIXED_ANSWER = "[SEG] and [BBOX]."


def class_text(name: str) -> str:
    """`inferior_vena_cava` → `inferior vena cava`."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


def pick(options, key: str):
    """Deterministic choice from `options` keyed by a string."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return options[int.from_bytes(digest, "little") % len(options)]


def referring(name: str, key: str) -> tuple[str, str]:
    return pick(REFERRING_QUERIES, key + "/q").format(name=class_text(name)), pick(ANSWERS, key + "/a")


def reasoning(explanation: str | None) -> str:
    if not explanation:
        return pick(ANSWERS, explanation or "")
    return REASONING_ANSWER.format(explanation=explanation.strip())


def false_query(name: str, key: str) -> tuple[str, str]:
    return pick(REFERRING_QUERIES, key + "/q").format(name=class_text(name)), FALSE_ANSWER.format(
        name=class_text(name)
    )

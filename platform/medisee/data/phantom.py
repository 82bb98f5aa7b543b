"""Procedural CT-like phantoms with labelled organs, for the demo and the tests.

Each slice: a body ellipse with a fat rim, a vertebra, 3-6 of 8 organ classes at
class-typical positions (relative to the body), sizes and intensities with jitter,
unlabelled distractor blobs, texture, blur and noise. Fully determined by (seed, index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medisee.data import prompts
from medisee.data.records import Query


@dataclass(frozen=True)
class Organ:
    name: str
    intensity: float  # 0..255 display value
    center: tuple[float, float]  # (x, y) in body semi-axis units, image-left = patient right
    axes: tuple[float, float]  # semi-axes in body semi-axis units
    short: str
    long: str
    explanation: str


ORGANS = (
    Organ(
        "liver",
        150,
        (-0.45, -0.10),
        (0.36, 0.36),
        "Which organ produces bile?",
        "The patient has raised bilirubin and jaundice. Which large solid organ in the upper right abdomen should be examined?",
        "The liver is the largest solid abdominal organ, in the right upper quadrant, and makes bile.",
    ),
    Organ(
        "spleen",
        138,
        (0.58, 0.05),
        (0.17, 0.22),
        "Which organ filters old red blood cells?",
        "After blunt trauma to the left flank, which blood-filtering organ behind the stomach is most at risk?",
        "The spleen lies in the left upper quadrant and removes aged red blood cells.",
    ),
    Organ(
        "right kidney",
        172,
        (-0.30, 0.45),
        (0.12, 0.18),
        "Which organ filters blood on the patient's right side, beside the spine?",
        "Urine output is low and the right flank is tender. Which paired organ on that side should be checked?",
        "The right kidney sits beside the spine on the patient's right and filters blood into urine.",
    ),
    Organ(
        "left kidney",
        172,
        (0.30, 0.45),
        (0.12, 0.18),
        "Which organ filters blood on the patient's left side, beside the spine?",
        "The left flank is tender and there is blood in the urine. Which paired organ on that side should be checked?",
        "The left kidney sits beside the spine on the patient's left and filters blood into urine.",
    ),
    Organ(
        "aorta",
        205,
        (0.05, 0.28),
        (0.07, 0.07),
        "Which vessel carries oxygenated blood down the abdomen?",
        "A pulsatile abdominal mass is felt. Which large artery just in front of the spine should be measured?",
        "The aorta is the round bright vessel directly in front of the vertebra.",
    ),
    Organ(
        "stomach",
        92,
        (0.28, -0.38),
        (0.22, 0.15),
        "Which hollow organ stores and digests food?",
        "The patient vomits after meals and feels full early. Which hollow organ in the left upper abdomen should be inspected?",
        "The stomach is the hollow, darker organ in the left upper abdomen.",
    ),
    Organ(
        "gallbladder",
        62,
        (-0.22, 0.16),
        (0.09, 0.07),
        "Which small organ stores bile?",
        "Pain under the right ribs after fatty meals suggests stones. Which small bile-storing sac should be looked at?",
        "The gallbladder is a small dark sac under the liver that stores bile.",
    ),
    Organ(
        "pancreas",
        122,
        (0.02, 0.06),
        (0.30, 0.07),
        "Which gland makes insulin and digestive enzymes?",
        "Blood lipase is high and the pain radiates to the back. Which elongated gland across the mid abdomen is inflamed?",
        "The pancreas is the elongated gland crossing the mid abdomen in front of the vessels.",
    ),
)
ORGAN_NAMES = tuple(o.name for o in ORGANS)
LOCATION_SHARE = 0.2


def _ellipse(size: int, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = (c * dx + s * dy) / max(ax, 0.5), (-s * dx + c * dy) / max(ay, 0.5)
    return u * u + v * v <= 1.0


def generate(seed: int, index: int, size: int = 128) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One phantom slice: uint8 H×W image and {organ name: bool mask} for the organs present."""
    rng = np.random.default_rng([seed, index])
    image = np.zeros((size, size), dtype=np.float32)
    bx, by = size / 2 + rng.uniform(-0.04, 0.04) * size, size / 2 + rng.uniform(-0.04, 0.04) * size
    bax, bay = size * rng.uniform(0.40, 0.46), size * rng.uniform(0.30, 0.36)
    body = _ellipse(size, bx, by, bax, bay)
    inner = _ellipse(size, bx, by, bax - size * 0.04, bay - size * 0.04)
    image[body] = 60
    image[inner] = 108

    count = int(rng.integers(3, 7))
    chosen = sorted(rng.choice(len(ORGANS), size=count, replace=False).tolist())
    labels = np.zeros((size, size), dtype=np.int16)
    for k in chosen:
        organ = ORGANS[k]
        cx = bx + (organ.center[0] + rng.normal(0, 0.05)) * bax
        cy = by + (organ.center[1] + rng.normal(0, 0.05)) * bay
        scale = rng.uniform(0.8, 1.2)
        region = _ellipse(
            size, cx, cy, organ.axes[0] * bax * scale, organ.axes[1] * bay * scale, rng.normal(0, 0.2)
        )
        region &= inner
        image[region] = organ.intensity + rng.normal(0, 6)
        labels[region] = k + 1

    vertebra = _ellipse(size, bx + rng.normal(0, 1), by + 0.62 * bay, 0.09 * bax, 0.11 * bay) & inner
    image[vertebra] = 235
    labels[vertebra] = 0
    for _ in range(int(rng.integers(1, 4))):
        blob = _ellipse(size, *rng.uniform(0.3, 0.7, 2) * size, *rng.uniform(0.02, 0.05, 2) * size) & inner
        blob &= labels == 0
        image[blob] = rng.uniform(70, 200)

    image += ndimage.gaussian_filter(rng.normal(0, 10, image.shape), 1.5)  # texture
    image = ndimage.gaussian_filter(image, 0.7) + rng.normal(0, 4, image.shape)
    masks = {ORGANS[k].name: labels == k + 1 for k in chosen}
    masks = {name: m for name, m in masks.items() if m.sum() >= 4}
    return np.clip(image, 0, 255).astype(np.uint8), masks


def location_query(
    name: str, masks: dict[str, np.ndarray], key: str = "", for_eval: bool = False
) -> Query | None:
    """A location-oriented query when the target is the unique extreme of its image."""
    if len(masks) < 2:
        return None
    cx = {n: np.nonzero(m)[1].mean() for n, m in masks.items()}
    area = {n: int(m.sum()) for n, m in masks.items()}
    phrases = (
        (
            min(cx, key=cx.get),
            "Which labelled structure lies furthest to the left of the image?",
            "It is the leftmost structure.",
        ),
        (
            max(cx, key=cx.get),
            "Which labelled structure lies furthest to the right of the image?",
            "It is the rightmost structure.",
        ),
        (
            max(area, key=area.get),
            "Which structure takes up the largest area in this slice?",
            "It is the largest structure in the slice.",
        ),
        (
            min(area, key=area.get),
            "Which structure is the smallest one in this slice?",
            "It is the smallest structure in the slice.",
        ),
    )
    for target, text, explanation in phrases:
        if target == name:
            return reasoning_query("reasoning_short", text, explanation, key, for_eval)
    return None


def reasoning_query(kind: str, text: str, explanation: str, key: str, for_eval: bool = False) -> Query:
    question, answer = prompts.reasoning(text, explanation, key, for_eval)
    return Query(kind, question, answer, explanation)


def queries_for(name: str, masks: dict[str, np.ndarray], key: str, for_eval: bool = False) -> list[Query]:
    """A referring query and one reasoning query for `name`; `for_eval` (val/test images) gives
    them the evaluation forms of `prompts`."""
    organ = ORGANS[ORGAN_NAMES.index(name)]
    text, answer = prompts.referring(name, key, for_eval)
    out = [Query("referring", text, answer)]
    location = (
        location_query(name, masks, key + "/reasoning", for_eval)
        if prompts.pick(range(100), key + "/loc") < LOCATION_SHARE * 100
        else None
    )
    if location is not None:
        out.append(location)
    elif prompts.pick((0, 1), key + "/len"):
        out.append(
            reasoning_query("reasoning_long", organ.long, organ.explanation, key + "/reasoning", for_eval)
        )
    else:
        out.append(
            reasoning_query("reasoning_short", organ.short, organ.explanation, key + "/reasoning", for_eval)
        )
    return out

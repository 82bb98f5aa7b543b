"""Optional judge for uncertain cases: any OpenAI-compatible vision chat endpoint.

The judge sees the image, the heatmap overlay and the three scores, and must answer with JSON
{"verdict": "present" | "absent" | "uncertain", "confidence": 0..1, "evidence": "..."}.
Malformed answers are retried; a timeout or a failing endpoint returns None, and the caller falls
back to the calibrated rule. Off unless configured; the API key comes from the environment.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from medisee.verify.decision import Verdict
from medisee.verify.heatmap import overlay_png
from medisee.verify.scores import Scores

if TYPE_CHECKING:
    from medisee.verify.calibrate import CalibratedVerifier, Evidence

SYSTEM_PROMPT = (
    "You verify medical image segmentation queries. Given a medical image, a heatmap of where a "
    "segmentation model looked for the queried target, and three evidence scores in [0, 1] "
    "(strength, compactness, purity), decide whether the queried target is present in the image. "
    'Answer with JSON only: {"verdict": "present" | "absent" | "uncertain", "confidence": <0..1>, '
    '"evidence": "<one sentence>"}.'
)


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0
    max_attempts: int = 3


@dataclass(frozen=True)
class JudgeAnswer:
    verdict: Verdict
    confidence: float
    evidence: str


def _png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _image_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def parse_answer(text: str) -> JudgeAnswer:
    """The JSON object in a chat answer (code fences allowed); ValueError when it is not valid."""
    match = re.search(r"\{.*\}", text or "", re.DOTALL)
    if not match:
        raise ValueError("no JSON object in the answer")
    data = json.loads(match.group(0))
    verdict = Verdict(str(data["verdict"]).lower())
    confidence = float(data.get("confidence", 0.0))
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence {confidence} outside [0, 1]")
    return JudgeAnswer(verdict, confidence, str(data.get("evidence", ""))[:500])


class Judge:
    def __init__(self, config: JudgeConfig, client=None):
        import httpx

        self.config = config
        self.client = client or httpx.Client(timeout=config.timeout_s)

    def messages(
        self,
        image: np.ndarray,
        similarity: np.ndarray,
        scores: Scores,
        query: str,
        clip_size: int,
        padded_map: bool = False,
    ) -> list:
        text = (
            f"Query: {query}\nScores: strength={scores.strength:.3f}, compactness={scores.compactness:.3f}, "
            f"purity={scores.purity:.3f}.\nFirst image: the medical image. Second image: the heatmap overlay."
        )
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": _png_data_url(_image_png(image))}},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": _png_data_url(overlay_png(image, similarity, clip_size, padded=padded_map))
                        },
                    },
                ],
            },
        ]

    def judge(
        self,
        image: np.ndarray,
        similarity: np.ndarray,
        scores: Scores,
        query: str,
        clip_size: int,
        padded_map: bool = False,
    ) -> JudgeAnswer | None:
        """The judge's answer, or None when the endpoint fails, times out or never answers in valid JSON."""
        import httpx

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {
            "model": self.config.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": self.messages(image, similarity, scores, query, clip_size, padded_map),
        }
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        for _ in range(self.config.max_attempts):
            try:
                response = self.client.post(url, json=body, headers=headers, timeout=self.config.timeout_s)
                response.raise_for_status()
                return parse_answer(response.json()["choices"][0]["message"]["content"])
            except httpx.TimeoutException:
                return None
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code < 500:
                    return None
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                continue
        return None


def judge_from_config(verifier_cfg) -> Judge | None:
    """The judge a `verifier` config section describes, or None when it names no endpoint."""
    v = verifier_cfg
    if not v.judge_base_url:
        return None
    return Judge(
        JudgeConfig(
            v.judge_base_url, v.judge_model, v.judge_api_key_env, v.judge_timeout_s, v.judge_max_attempts
        )
    )


def judged_verdicts(
    judge: Judge,
    verifier: CalibratedVerifier,
    evidence: list[Evidence],
    rows: list[dict],
    similarities: list[np.ndarray],
    clip_size: int,
    padded_map: bool = False,
) -> list[Verdict]:
    """One verdict per labelled row (`image_png`, `query`), the judge asked where the calibrated
    rule is uncertain (`medisee.verify.verifier.verify`), e.g. to benchmark rejection with it."""
    from medisee.data.codec import decode_image
    from medisee.verify.verifier import verify  # imported here: verifier imports this module

    return [
        verify(e, verifier, judge, decode_image(r["image_png"]), s, r["query"], clip_size, padded_map).verdict
        for e, r, s in zip(evidence, rows, similarities, strict=True)
    ]

"""Predictor: numpy images and free-text queries in, one QueryResult per query out.

The three stages in one process, in the order batch scoring and serving run them on separate
actors / replicas: MLLM -> verifier screening -> decoder (skipped for rejected queries when
`early_reject`) -> final verdict. With `early_reject`, a query whose final verdict is absent gets
no box and no mask (its decoder signals stay in the result as evidence); without it (evaluation),
every query keeps its box and mask.

    predictor = load_predictor("models:/medisee@candidate")     # medisee.artifact.model_dir
    results = predictor.predict(image, ["Segment the liver.", "Where is the spleen?"])
"""

from __future__ import annotations

import time

import numpy as np

from medisee.infer.decoder_stage import DecoderStage
from medisee.infer.images import as_rgb_uint8
from medisee.infer.mllm_stage import MLLMStage
from medisee.infer.results import Decoded, QueryResult, assemble, check_box, wants_decoder
from medisee.infer.verifier_stage import VerifierStage


class Predictor:
    def __init__(
        self,
        model,
        calibration=None,
        judge=None,
        *,
        mode: str = "teacher_forced",
        max_new_tokens: int = 48,
        mask_threshold: float = 0.0,
        early_reject: bool = True,
        artifact=None,
    ):
        self.model = model
        self.mllm = MLLMStage(model, mode, max_new_tokens)
        self.verifier = VerifierStage(calibration, judge, model.clip_size, model.shares_image_encoder)
        self.decoder = DecoderStage(model, mask_threshold)
        self.early_reject = early_reject
        self.artifact = artifact  # medisee.artifact.model_dir.LoadedModel when loaded from one

    def predict(
        self, image: np.ndarray, queries: list[str] | str, mode: str | None = None
    ) -> list[QueryResult]:
        """Every query about one image; the image is encoded once."""
        queries = [queries] if isinstance(queries, str) else list(queries)
        return self.predict_batch([image], [queries], mode)[0]

    def segment_box(self, image: np.ndarray, box) -> Decoded:
        """MedSAM-style interactive segmentation: the box (pixel xyxy, last pixel inclusive) alone
        prompts the mask decoder; no text, no MLLM, no verifier."""
        return self.segment_boxes([image], [0], [box])[0]

    def segment_boxes(self, images: list[np.ndarray], image_index: list[int], boxes) -> list[Decoded]:
        """One mask per box; boxes[q] lies in images[image_index[q]], each image encoded once."""
        images = [as_rgb_uint8(im) for im in images]
        if len(boxes) != len(image_index):
            raise ValueError(f"{len(boxes)} boxes for {len(image_index)} image indices")
        for box, i in zip(boxes, image_index, strict=True):
            check_box(box, images[i].shape[:2])
        return self.decoder.segment_boxes(images, list(image_index), np.asarray(boxes, dtype=np.float64))

    def predict_batch(
        self, images: list[np.ndarray], queries: list[list[str]], mode: str | None = None
    ) -> list[list[QueryResult]]:
        """images[i] with queries[i]; one list of results per image."""
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images but {len(queries)} query lists")
        images = [as_rgb_uint8(im) for im in images]
        started = time.perf_counter()
        encodings, embeddings = self.mllm.encode(images, queries, mode)  # embeddings: lite's, reused
        after_mllm = time.perf_counter()
        screenings = self.verifier.screen(encodings)
        to_decode = [i for i, s in enumerate(screenings) if wants_decoder(s, self.early_reject)]
        after_screen = time.perf_counter()
        decoded = dict(
            zip(
                to_decode,
                self.decoder(
                    images,
                    [encodings[i].image_index for i in to_decode],
                    np.stack([encodings[i].candidates for i in to_decode]) if to_decode else [],
                    embeddings,
                ),
                strict=True,
            )
        )
        after_decode = time.perf_counter()
        results: list[list[QueryResult]] = [[] for _ in images]
        for i, (enc, screening) in enumerate(zip(encodings, screenings, strict=True)):
            verdict, decided_by = self.verifier.decide(
                screening, decoded.get(i), images[enc.image_index], enc
            )
            result = assemble(enc, screening, decoded.get(i), verdict, decided_by, self.early_reject)
            results[enc.image_index].append(result)
        timings = {
            "mllm_s": after_mllm - started,
            "verifier_s": after_screen - after_mllm + (time.perf_counter() - after_decode),
            "decoder_s": after_decode - after_screen,
        }
        for per_image in results:
            for result in per_image:
                result.timings = dict(timings)
        return results

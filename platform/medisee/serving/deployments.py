"""The three model deployments. Each wraps one of the Predictor's stage classes; MLLM and decoder
batch requests dynamically (`@serve.batch`) and serve several registered versions of one base
(`@serve.multiplexed`: the model id is the version's reference). The decoder also answers box-prompt
requests (`segment_boxes`: a user's boxes, no text), batched on their own."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from medisee.serving.args import AppArgs


def _settings(args: AppArgs):
    from medisee.storage import StorageSettings

    return (
        StorageSettings(endpoint=args.storage_endpoint)
        if args.storage_endpoint
        else StorageSettings.resolve()
    )


class _Versioned:
    """Shared by the MLLM and decoder deployments: version swapping and (optional) batching."""

    part = ""

    def __init__(self, args: AppArgs):
        from medisee.serving.versions import VersionedPart

        self.args = args
        self.resident = VersionedPart(args.model, self.part, _settings(args), args.tracking_uri)
        self.stage_options = getattr(args, "mllm" if self.part == "mllm" else "decoder")
        self.batch_wait_s = self.stage_options.batch_wait_timeout_s if args.batching else 0.0
        self.in_flight = 0
        self._batched = self._batcher(self._batch)

        async def load(ref: str):  # a function, not a bound method: Serve keeps its cache on it
            return await asyncio.to_thread(self.resident.weights_of, ref)

        self.weights = serve.multiplexed(max_num_models_per_replica=args.multiplexed_models_per_replica)(load)

    def _batcher(self, fn):
        """`fn` batched with the application's settings: decorated here, not on the class, so that
        they reach Serve's batcher and multiplexer (neither can be changed after decoration)."""
        return serve.batch(
            max_batch_size=self.stage_options.max_batch_size if self.args.batching else 1,
            batch_wait_timeout_s=self.batch_wait_s,
            max_concurrent_batches=self.stage_options.max_concurrent_batches,
        )(fn)

    async def _run(self, fn, *inputs):
        ref = serve.get_multiplexed_model_id() or self.args.model
        weights = (
            await self.weights(ref)
            if ref != self.resident.default_ref or self.resident.current != ref
            else None
        )
        return await asyncio.to_thread(self._locked, ref, weights, fn, *inputs)

    def _locked(self, ref, weights, fn, *inputs):
        with self.resident.lock:
            self.resident.use(ref, weights)
            return fn(*inputs)

    def input_sizes(self) -> dict:
        """The size the ingress prepares this part's input to (every version of a base shares it)."""
        name = "clip_size" if self.part == "mllm" else "sam_size"
        return {name: int(getattr(self.resident.model, name))}

    async def __call__(self, *request):
        return await self._submit(self._batched, *request)

    async def _submit(self, batched, *request):
        # Serve's batcher closes a batch batch_wait_timeout_s after its first request, even when
        # nothing else is coming. Wait only while other requests are in flight on this replica: a
        # lone request runs at once, under load the batch fills.
        self.in_flight += 1
        try:
            batched.set_batch_wait_timeout_s(self.batch_wait_s if self.in_flight > 1 else 0.0)
            return await batched(*request)
        finally:
            self.in_flight -= 1


@serve.deployment
class MLLMDeployment(_Versioned):
    part = "mllm"

    def __init__(self, args: AppArgs):
        from medisee.infer.mllm_stage import MLLMStage

        super().__init__(args)
        self.stage = MLLMStage(self.resident.model, args.mode, args.max_new_tokens)

    async def _batch(self, images: list, queries: list[list[str]]):  # PreparedImage or array
        """Per request: (its encodings, its image's SAM embedding when the model shares its image
        encoder, for the decoder deployment to reuse; else None). The embedding travels as float16:
        in float32 (4 MiB for LiteMedSAM's) it would not fit the 4 MiB gRPC message of Serve's
        throughput mode; the rounding moves a mask pixel at most (tests/lite/test_lite_serving.py)."""
        encodings, embeddings = await self._run(self.stage.encode, images, queries)
        per_request = [[] for _ in images]
        for enc in encodings:
            per_request[enc.image_index].append(enc)
        shared = embeddings.half().cpu().numpy() if embeddings is not None else [None] * len(images)
        return [(encs, shared[i]) for i, encs in enumerate(per_request)]


@serve.deployment
class DecoderDeployment(_Versioned):
    part = "decoder"

    def __init__(self, args: AppArgs):
        from medisee.infer.decoder_stage import DecoderStage

        super().__init__(args)
        self.stage = DecoderStage(self.resident.model, args.mask_threshold)
        self._batched_boxes = self._batcher(self._box_batch)

    async def _batch(self, images: list, candidates: list[np.ndarray]):  # PreparedImage or array
        return await self._decode(self.stage, images, candidates)

    async def segment_boxes(self, image, boxes: np.ndarray) -> list:
        """Box-prompt mode: boxes (Q, 4) pixel xyxy of the (prepared) image, checked by the ingress ->
        one Decoded per box, its mask as RLE."""
        return await self._submit(self._batched_boxes, image, boxes)

    async def _box_batch(self, images: list, boxes: list[np.ndarray]):
        return await self._decode(self.stage.segment_boxes, images, boxes)

    async def _decode(self, fn, images: list, prompts: list[np.ndarray]) -> list[list]:
        """`fn(images, image_index, stacked prompts)` for a batch of requests, one list per request."""
        index = [i for i, c in enumerate(prompts) for _ in range(len(c))]
        stacked = np.concatenate([c for c in prompts if len(c)]) if index else np.zeros((0,))
        decoded = await self._run(fn, images, index, stacked) if index else []
        from medisee.data.codec import mask_to_rle

        out: list[list] = [[] for _ in images]
        for i, d in zip(index, decoded, strict=True):
            d.mask_rle, d.mask = mask_to_rle(d.mask), None  # small across the handle
            out[i].append(d)
        return out


@serve.deployment
class VerifierDeployment:
    """MedVeriSeg screening before decoding and the final decision after it, per version's calibration."""

    def __init__(self, args: AppArgs):
        self.args = args
        self.stages: dict[str, object] = {}
        self._stage(args.model)  # the default version's calibration, before the first request

    def _stage(self, ref: str):
        if ref not in self.stages:
            from medisee.artifact.model_dir import describe_model
            from medisee.infer.verifier_stage import VerifierStage

            model = describe_model(ref, settings=_settings(self.args), tracking_uri=self.args.tracking_uri)
            self.stages[ref] = VerifierStage.from_json(
                model["calibration_json"],
                model["inputs"]["clip_size"],
                self.args.verifier_config(),
                model["inputs"]["padded_map"],
            )
        return self.stages[ref]

    def screen(self, ref: str, encodings: list):
        return self._stage(ref).screen(encodings)

    def decide(self, ref: str, items: list[tuple]) -> list[tuple[str, str]]:
        """items: (screening, decoded or None, image or None, encoding) per query."""
        stage = self._stage(ref)
        return [stage.decide(s, d, image, enc) for s, d, image, enc in items]

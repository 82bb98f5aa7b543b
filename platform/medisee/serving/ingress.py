"""The HTTP ingress: validates and decodes a request, then MLLM -> verifier -> decoder (unless
rejected) -> final verdict, each on its own deployment; the image of a multi-query request is
encoded once by each stage. The final verdict goes back to the verifier only for queries its rule
left uncertain (the others are settled by the screening). A box-prompt request (`box`, no queries)
goes to the decoder alone: one mask per box."""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from medisee.infer.images import PreparedImage, prepare_image, with_embedding
from medisee.infer.results import assemble, wants_decoder
from medisee.infer.verifier_stage import settled
from medisee.serving.args import AppArgs
from medisee.serving.auth import KeyRing
from medisee.serving.requests import ApiError, openapi_request_body, parse_request, read_body
from medisee.serving.responses import render_size, response_parts

log = logging.getLogger("medisee.serve")
api = FastAPI(
    title="MediSee",
    version="1",
    description="Reasoning segmentation of medical images: a mask, a box and an answer per question, "
    "with MedVeriSeg's check that the asked-for target exists.",
)
PAGE = Path(__file__).with_name("page.html")


def error(status: int, message: str, request_id: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"status": status, "message": message}, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers or {})


def replica_lost(exc: BaseException) -> bool:
    """The replica a call went to died or became unreachable (its process or node was lost) before it
    answered."""
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError) or isinstance(getattr(exc, "cause", None), RayActorError)


async def call_stage(send: Callable[[], Awaitable], stage: str):
    """`send()` once more when the replica it went to was lost mid-call: the stages have no side
    effects, and Serve's router no longer chooses a replica that failed that way, so the second call
    goes to a live one (a node lost under load otherwise fails every request in flight there)."""
    try:
        return await send()
    except Exception as exc:
        if not replica_lost(exc):
            raise
        log.warning("a %s replica was lost mid-call (%s); sending the call again", stage, type(exc).__name__)
        return await send()


def graph_error(exc: Exception, request_id: str) -> JSONResponse:
    """The answer to a failure of the graph: overload, an incompatible version, a lost replica, a bug."""
    from ray.serve.exceptions import BackPressureError

    from medisee.serving.versions import IncompatibleVersion

    if isinstance(exc, BackPressureError) or "BackPressure" in type(exc).__name__:
        return error(
            503, "overloaded: too many requests queued; retry shortly", request_id, {"Retry-After": "1"}
        )
    if isinstance(exc, IncompatibleVersion) or "IncompatibleVersion" in str(exc):
        return error(422, str(exc).splitlines()[-1][:300], request_id)
    if replica_lost(exc):  # lost twice in a row: replicas are being replaced after a node loss
        log.warning("request %s: a replica was lost again (%s)", request_id, type(exc).__name__)
        message = "a model replica was lost; it is being replaced, retry shortly"
        return error(503, message, request_id, {"Retry-After": "2"})
    log.exception("request %s failed", request_id)
    return error(500, f"internal error ({type(exc).__name__}); request id {request_id}", request_id)


def overloaded(request_id: str) -> JSONResponse:
    return error(
        503, "overloaded: too many requests in flight; retry shortly", request_id, {"Retry-After": "1"}
    )


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, args: AppArgs, mllm, verifier, decoder):
        self.args, self.mllm, self.verifier, self.decoder = args, mllm, verifier, decoder
        self.keys = KeyRing(args.api_keys_env, args.api_keys_file, args.allow_anonymous)
        self.reconfigure({"model": args.model, "extra_models": args.extra_models})
        self.judge = bool(args.judge_base_url)
        self.pool = ThreadPoolExecutor(args.ingress.decode_threads, thread_name_prefix="medisee-decode")
        self.in_flight = 0
        self.sizes: dict | None = None

    def reconfigure(self, config: dict) -> None:
        """The served version (Serve calls this on a user_config change: no replica restarts; the model
        replicas load the new version's weights on their resident base through multiplexing)."""
        self.model = config.get("model") or self.args.model
        extra = config.get("extra_models") or []
        self.versions = [self.model, *[m for m in [self.args.model, *extra] if m != self.model]]
        self.ready: tuple[float, dict] | None = None

    def served_version(self) -> str:
        """For batch scoring through this application (medisee score --via-serve)."""
        return self.model

    # ----- helpers -------------------------------------------------------------------------------
    def authorise(self, request: Request) -> None:
        if not self.keys.admits(request.headers):
            raise ApiError(
                401, "missing or wrong API key (send it as 'Authorization: Bearer <key>' or 'X-API-Key')"
            )

    def version(self, requested: str | None, header: str | None) -> str:
        version = requested or header or self.model
        if version not in self.versions:  # the served references are URIs: not for anonymous eyes
            raise ApiError(422, "unknown model_version; GET /v1/models lists the served versions")
        return version

    async def run(self, fn, *args):
        """CPU work (decoding, preparing, rendering) on the ingress's own threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def input_sizes(self) -> dict:
        """The model's input sizes, asked once of the MLLM and decoder deployments (every version of a
        base shares them)."""
        if self.sizes is None:
            clip, sam = await asyncio.gather(
                self.mllm.input_sizes.remote(), self.decoder.input_sizes.remote()
            )
            self.sizes = {**clip, **sam}
        return self.sizes

    async def prepare(self, image: np.ndarray | PreparedImage) -> PreparedImage:
        if isinstance(image, PreparedImage):
            return image
        sizes = await self.input_sizes()
        return await self.run(prepare_image, image, sizes["clip_size"], sizes["sam_size"])

    async def judge_image(self, image) -> np.ndarray | None:
        """What the judge sees: the image downscaled (a handle call carries at most a few MiB)."""
        if not self.judge or isinstance(image, PreparedImage):
            return None
        from PIL import Image

        h, w = render_size(image.shape[:2], self.args.max_render_side)
        return await self.run(lambda: np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)))

    async def answer(
        self,
        image: np.ndarray | PreparedImage,
        queries: list[str],
        version: str,
        early_reject: bool | None = None,
    ) -> tuple[list, dict]:
        """The graph for one image: results (QueryResult, mask as RLE) and seconds per stage. Only the
        prepared image (model-sized, whatever the original's size) crosses to the model replicas."""
        early_reject = self.args.early_reject if early_reject is None else early_reject
        t0 = time.perf_counter()
        prepared = await self.prepare(image)
        mllm = self.mllm.options(multiplexed_model_id=version)
        encodings, embedding = await call_stage(lambda: mllm.remote(prepared, queries), "MLLM")
        prepared = with_embedding(prepared, embedding)  # medisee-lite: the decoder does not encode again
        t1 = time.perf_counter()
        screenings = await call_stage(lambda: self.verifier.screen.remote(version, encodings), "verifier")
        t2 = time.perf_counter()
        todo = [j for j, s in enumerate(screenings) if wants_decoder(s, early_reject)]
        decoded = {}
        if todo:
            candidates = np.stack([encodings[j].candidates for j in todo])
            decoder = self.decoder.options(multiplexed_model_id=version)
            out = await call_stage(lambda: decoder.remote(prepared, candidates), "decoder")
            decoded = dict(zip(todo, out, strict=True))
        t3 = time.perf_counter()
        verdicts = [settled(s) for s in screenings]
        undecided = [j for j, v in enumerate(verdicts) if v is None]
        if undecided:  # only uncertain queries need the decoder's signals (and the judge): one more hop
            seen = await self.judge_image(image)
            items = [(screenings[j], decoded.get(j), seen, encodings[j]) for j in undecided]
            decided = await call_stage(lambda: self.verifier.decide.remote(version, items), "verifier")
            for j, verdict in zip(undecided, decided, strict=True):
                verdicts[j] = verdict
        results = [
            assemble(e, s, decoded.get(j), v, d, early_reject)
            for j, (e, s, (v, d)) in enumerate(zip(encodings, screenings, verdicts, strict=True))
        ]
        t4 = time.perf_counter()
        return results, {"mllm_s": t1 - t0, "verifier_s": (t2 - t1) + (t4 - t3), "decoder_s": t3 - t2}

    async def answer_boxes(self, image: np.ndarray, boxes: list, version: str) -> tuple[list, dict]:
        """Box-prompt mode: one Decoded (mask as RLE) per box, from the decoder deployment alone. As in
        `answer`, only the prepared image and the boxes (pixel xyxy, checked) cross to the replica."""
        t0 = time.perf_counter()
        prepared = await self.prepare(image)
        decoder = self.decoder.options(multiplexed_model_id=version)
        prompts = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        decoded = await call_stage(lambda: decoder.segment_boxes.remote(prepared, prompts), "decoder")
        return decoded, {"decoder_s": time.perf_counter() - t0}

    # ----- endpoints -----------------------------------------------------------------------------
    @api.post("/v1/segment", openapi_extra=openapi_request_body())
    async def segment(self, request: Request):
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            self.authorise(request)
            body = await read_body(
                request, self.args.max_upload_bytes, self.args.body_timeout_s, self.args.min_body_bytes_per_s
            )
        except ApiError as exc:
            return error(exc.status, exc.message, request_id, exc.headers)
        if self.in_flight >= self.args.ingress.max_in_flight:  # admitted below Serve's own queue limit
            return overloaded(request_id)
        self.in_flight += 1
        try:
            return await self.segment_admitted(request, body, request_id, started)
        finally:
            self.in_flight -= 1

    async def segment_admitted(self, request: Request, body: bytes, request_id: str, started: float):
        try:
            req = await parse_request(request.headers, body, self.args, self.run)
            version = self.version(req.model_version, request.headers.get("serve_multiplexed_model_id"))
            graph = (
                self.answer_boxes(req.image, req.boxes, version)
                if req.boxes is not None
                else self.answer(req.image, req.queries, version)
            )
            results, timings = await asyncio.wait_for(graph, self.args.request_timeout_s)
            parts = await self.run(response_parts, results, req.image, req, self.args.max_render_side)
        except ApiError as exc:
            return error(exc.status, exc.message, request_id, exc.headers)
        except TimeoutError:
            return error(
                503,
                f"no answer within {self.args.request_timeout_s} s; try again",
                request_id,
                {"Retry-After": "2"},
            )
        except Exception as exc:  # the graph's own failures: overload first, then anything else
            return graph_error(exc, request_id)
        total = time.perf_counter() - started
        if req.boxes is not None:
            log.info("request %s: %d boxes, %.3f s%s", request_id, len(req.boxes), total,
                     f", boxes {req.boxes}" if self.args.log_payloads else "")  # fmt: skip
        else:
            log.info("request %s: %d queries, %.3f s%s", request_id, len(req.queries), total,
                     f", queries {req.queries}" if self.args.log_payloads else "")  # fmt: skip
        return {
            "request_id": request_id,
            "model_version": version,
            **parts,
            "timings": {**timings, "total_s": total},
        }

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz(self):
        """Ready while every deployment answers and the golden pair comes back as stored; checked again
        once the last check is older than ready_ttl_s. The reason names the failed step, never the
        exception's text (that goes to the log)."""
        now = time.monotonic()
        if self.ready is None or now - self.ready[0] > self.args.ready_ttl_s:
            from medisee.artifact.golden import GoldenMismatch

            try:
                golden = await asyncio.wait_for(self.golden(), self.args.request_timeout_s)
            except TimeoutError:
                return self.not_ready("the model deployments did not answer in time", None)
            except GoldenMismatch as exc:
                return self.not_ready("the golden pair did not come back as stored", exc)
            except Exception as exc:
                return self.not_ready("the model deployments did not answer", exc)
            self.ready = (now, golden)
        return {"ready": True, "golden": self.ready[1]}

    def not_ready(self, reason: str, exc: Exception | None) -> JSONResponse:
        self.ready = None
        log.warning("readyz: %s%s", reason, f": {type(exc).__name__}: {exc}" if exc else "")
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    async def golden(self) -> dict:
        import json

        from medisee.artifact.fetch import read_artifact_file
        from medisee.artifact.golden import GOLDEN_ANSWER, GOLDEN_IMAGE, answer_dict, compare_golden
        from medisee.data.codec import decode_image
        from medisee.serving.deployments import _settings

        settings, uri = _settings(self.args), self.args.tracking_uri
        want = read_artifact_file(self.model, GOLDEN_ANSWER, settings=settings, tracking_uri=uri)
        png = read_artifact_file(self.model, GOLDEN_IMAGE, settings=settings, tracking_uri=uri)
        if want is None or png is None:
            raise RuntimeError(f"{self.model} stores no golden pair")
        want = json.loads(want)
        (result,), _ = await self.answer(decode_image(png), [want["query"]], self.model, early_reject=False)
        return compare_golden(answer_dict(result, result.mask_rle), want)

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self.authorise(request)
        except ApiError as exc:
            return error(exc.status, exc.message, uuid.uuid4().hex)
        return {"default": self.model, "versions": self.versions, "mode": self.args.mode,
                "early_reject": self.args.early_reject}  # fmt: skip

    @api.get("/", response_class=HTMLResponse)
    async def page(self):
        return HTMLResponse(PAGE.read_text() if PAGE.exists() else "<h1>MediSee</h1>")

"""Online serving benchmark (CPU, real HTTP): the Serve application under load, tiny or medisee-lite.

One run builds the model's artifact (`--preset tiny`, the default, or `lite`: medisee-lite with its
real SmolLM2 and LiteMedSAM weights and untrained heads, phantoms at 256 px, longer windows, a
single round, no (d)) in a temporary folder, starts a local Ray (2 CPUs) and Serve
on a free 127.0.0.1 port, and measures, side by side:

  (a) dynamic batching on vs. off (`AppArgs(batching=False)`): throughput and p50/p99 latency at
      concurrency 1, 8 and 32 (closed loop: that many async httpx clients, one query per request,
      8 phantom images × a query about an organ they show);
  (b) the graph's overhead at concurrency 1: p50 over HTTP minus p50 of the same stages in this
      process (`Predictor.from_artifact`, same artifact, same early_reject, 1 torch thread as in a
      replica), same image and query;
  (c) early rejection's saving on a mix with 50 % false queries (an organ the image does not show):
      `early_reject=True` vs. `False`. The untrained tiny model's verifier rejects nothing under the
      default thresholds, so the artifact of (c) carries a calibration whose rule says "absent" for
      about half of the mix (strength below the mix's median; see docs/benchmarks.md); the share
      actually rejected is measured from the answers and printed next to the saving;
  (d) Serve's own cost with no model: an HTTP request to an ingress that answers at once (the proxy
      hop), and what one handle call carrying the image adds (each hop of the graph).

Both variants of a comparison are deployed at once as two applications under their own route
prefixes (replica CPUs reduced so that both fit 2 CPUs), and measured in alternation, round after
round, so that drifting load on a shared machine hits both alike.

Where the time goes, per window: the stage times the answers report ("timings"), the batches Serve
formed (`serve_actual_batch_size`, from Ray's Prometheus endpoint) and the CPU milliseconds per
request of every process of this Ray (replicas by deployment, HTTP proxy, Ray's daemons, this client).

Last lines, one per figure (the last is the headline):
  {"name": "serve_overhead_p50_ms", "value": <ms, batching on as deployed>, "unit": "ms", "target": 15}
  {"name": "serve_overhead_p50_ms_batching_off", "value": <ms>, "unit": "ms", "target": 15}
  {"name": "early_reject_rejected_share", "value": <% of the answers>, "unit": "%", "target": null}
  {"name": "early_reject_saving", "value": <% less time per request>, "unit": "%", "target": null}
  {"name": "model_batching_ceiling", "value": <the model stages in-process, 8 requests one at a time
                                               over one batch of 8: batching's limit>, "unit": "x", "target": null}
  {"name": "serve_proxy_p50_ms" / "serve_handle_call_p50_ms", ...}  (d): Serve's own cost, no model
  {"name": "serve_large_<side>px_rps_c<n>" / "serve_large_<side>px_p50_ms_c<n>" /
   "serve_small_128px_rps_c<n>", ...}  (d): --large-side² vs. 128² uploads at --large-concurrency
  {"name": "serve_large_<side>px_errors", "value": <requests>, "unit": "requests", "target": 0}
  {"name": "serve_batching_speedup_c32", "value": <ratio>, "unit": "x", "target": 2.5}
With --preset lite the names start with "lite_", (d) is left out and (a)'s figures come per level
("lite_serve_rps_c<n>", "lite_serve_p50_ms_c<n>", "lite_serve_p99_ms_c<n>", "lite_serve_batching_speedup_c<n>").
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_LOG_TO_DRIVER", "0")  # replicas' access logs would be streamed to this process
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # batch-size metrics within a second
os.environ.pop("MEDISEE_API_KEYS", None)  # no API key: the benchmark measures the graph

IMAGES = 8
SEED = 7
# Per preset: the model preset, the phantoms' side, request timeouts and the defaults of the windows.
PRESETS = {
    # timeout: the client's and the proxy's; app_timeout: the application's own (AppArgs.request_timeout_s)
    "tiny": dict(model_preset="tiny", image_size=128, timeout=120.0, app_timeout=30.0, seconds=8.0, warmup=3.0, rounds=2,
                 calls=40, ceiling_rounds=5, large=True),
    "lite": dict(model_preset="medisee-lite", image_size=256, timeout=900.0, app_timeout=880.0, seconds=90.0, warmup=30.0,
                 rounds=1, calls=6, ceiling_rounds=1, large=False),
}  # fmt: skip


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- requests ----------------------------------------------------------------------------------
def png_bytes(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def body(image, query: str) -> bytes:
    return json.dumps({"image": base64.b64encode(png_bytes(image)).decode(), "queries": [query]}).encode()


def request_mix(size: int):
    """Per phantom image: a query about an organ it shows (true) and one about an organ it lacks (false)."""
    from medisee.data import phantom

    images, true_pairs, false_pairs = [], [], []
    for index in range(IMAGES):
        image, masks = phantom.generate(SEED, index, size)
        present = sorted(masks)
        absent = [o for o in phantom.ORGAN_NAMES if o not in masks]
        images.append(image)
        true_pairs.append((index, f"Segment the {present[index % len(present)]}."))
        false_pairs.append((index, f"Segment the {absent[index % len(absent)]}."))
    return images, true_pairs, false_pairs


# ----- load --------------------------------------------------------------------------------------
@dataclass
class Window:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of the requests answered in the window
    errors: int = 0
    sent: int = 0  # every request of the run, warm-up and drain included (for requests per batch)
    timings: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    rejected: int = 0  # answers whose rule said absent (decoder skipped with early rejection)
    answers: int = 0

    def add(self, other: Window) -> None:
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.errors += other.errors
        self.sent += other.sent
        self.rejected += other.rejected
        self.answers += other.answers
        for k, v in other.timings.items():
            self.timings[k] += v

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else float("nan")

    def ms(self, q: float) -> float:
        return 1000 * percentile(self.latencies, q)

    def stage_ms(self) -> dict[str, float]:
        return {k: round(1000 * statistics.mean(v), 1) for k, v in self.timings.items() if v}


async def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, warmup: float, timeout: float
) -> Window:
    """`concurrency` clients, each sending its next request when the previous one is answered; the
    requests answered within [warm-up end, warm-up end + seconds] are measured."""
    import httpx

    window = Window()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        begin, end = started + warmup, started + warmup + seconds

        async def worker(offset: int) -> None:
            i = offset
            while (t0 := time.perf_counter()) < end:
                response = await client.post(url, content=bodies[i % len(bodies)], headers=headers)
                t1 = time.perf_counter()
                i += concurrency
                window.sent += 1
                if not begin <= t1 <= end:  # warm-up, or past the window
                    continue
                if response.status_code != 200:
                    window.errors += 1
                    continue
                window.latencies.append(t1 - t0)
                answer = response.json()
                for k, v in answer["timings"].items():
                    window.timings[k].append(v)
                for result in answer["results"]:
                    window.answers += 1
                    window.rejected += result["verdict"] == "absent" and result["decided_by"] == "rule"

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    window.seconds = seconds
    return window


# ----- Serve -------------------------------------------------------------------------------------
def two_apps_args(model: str, **changes):
    """AppArgs with replica CPUs reduced so that two applications fit 2 CPUs (1.0 each)."""
    from medisee.serving.args import AppArgs, IngressOptions, StageOptions

    return AppArgs(
        model=model,
        mllm=StageOptions(num_cpus=0.4),
        decoder=StageOptions(num_cpus=0.4),
        verifier=StageOptions(num_cpus=0.1, max_batch_size=16),
        ingress=IngressOptions(num_cpus=0.1),
        allow_anonymous=True,  # loopback only
        **changes,
    )


def deploy(base: str, apps: dict) -> dict[str, str]:
    """{name: AppArgs} as applications at /name; returns {name: segment URL} once each is ready."""
    import httpx
    from ray import serve

    from medisee.serving.app import build_app

    for name, args in apps.items():
        started = time.perf_counter()
        serve.run(build_app(args), name=name, route_prefix=f"/{name}")
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/{name}/readyz", timeout=60).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"application {name} not ready")
        log(f"deployed {name} in {time.perf_counter() - started:.1f} s")
    time.sleep(5)  # let the controller and the new replicas settle
    return {name: f"{base}/{name}/v1/segment" for name in apps}


BATCH_LINE = re.compile(r"^ray_serve_actual_batch_size_(count|bucket)\{(.*)\} ([0-9.e+]+)$")


def batch_counters(port: int) -> dict[tuple[str, str], dict[str, float]]:
    """{(application, deployment): {"count": batches, "le=<bound>": batches up to that size}} from
    Serve's `serve_actual_batch_size` histogram (its `_sum` reads half the true sum in Ray 2.60, so
    requests per batch come from the requests sent instead)."""
    import httpx

    out: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        match = BATCH_LINE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            key = (labels.get("application", ""), labels.get("deployment", "").removesuffix("Deployment"))
            name = "count" if match.group(1) == "count" else f"le={float(labels['le']):g}"
            out[key][name] += float(match.group(3))
    return out


def batch_summary(before: dict, after: dict, app: str, sent: int) -> dict[str, str]:
    """Per batched deployment: requests per batch (requests sent / batches) and the share of batches
    of 1, 2, 3-4 and 5-8 requests."""
    summary = {}
    for (application, deployment), counts in after.items():
        if application != app:
            continue
        old = before.get((application, deployment), {})
        delta = {k: v - old.get(k, 0.0) for k, v in counts.items()}
        batches = delta.get("count", 0.0)
        if batches <= 0:
            continue
        shares, below = [], 0.0
        for label, bound in (("1", 1), ("2", 2), ("3-4", 4), ("5-8", 8)):
            upto = delta.get(f"le={bound}", 0.0)
            shares.append(f"{label}:{100 * (upto - below) / batches:.0f}%")
            below = upto
        summary[deployment] = f"{sent / batches:.2f} req/batch ({' '.join(shares)})"
    return summary


def cpu_seconds(app: str) -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far)} of this Ray's processes. Roles: the replicas of `app` by
    deployment, the HTTP proxy, the Serve controller, the other application's (idle) replicas, Ray's
    own daemons and idle workers, and this process (the load generator)."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    daemons = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    processes = [*raylet.children(recursive=True), *(psutil.Process(pid) for pid in daemons)]
    out: dict[int, tuple[str, float]] = {}
    for process in [*processes, psutil.Process(os.getpid())]:
        try:
            title = (process.cmdline() or [""])[0]
            if process.pid == os.getpid():
                role = "client"
            elif title.startswith("ray::ServeReplica:"):
                _, application, deployment = title.removeprefix("ray::").split(":", 2)
                deployment = deployment.split(".", 1)[0].removesuffix("Deployment")  # title: + the method
                role = deployment if application == app else "other app"
            elif title.startswith("ray::ProxyActor"):
                role = "proxy"
            elif title.startswith("ray::ServeController"):
                role = "controller"
            else:
                role = "ray daemons"
            times = process.cpu_times()
            out[process.pid] = (role, times.user + times.system)
        except psutil.Error:
            continue
    return out


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """CPU milliseconds per request by role (processes alive at both ends), largest first."""
    roles: dict[str, float] = defaultdict(float)
    for pid, (role, seconds) in after.items():
        if pid in before:
            roles[role] += seconds - before[pid][1]
    ranked = sorted(roles.items(), key=lambda kv: -kv[1])
    return {role: round(1000 * seconds / max(requests, 1), 1) for role, seconds in ranked}


def batching_ceiling(predictor, pairs: list[tuple], rounds: int) -> float:
    """Per-request time of the model stages in this process, 8 requests one at a time over 8 as one
    batch (1 thread, as a replica): what batching could give if serving cost nothing."""
    pairs = pairs[:8]
    alone, batched = [], []
    predictor.predict_batch([i for i, _ in pairs], [[q] for _, q in pairs])
    for _ in range(rounds):
        t0 = time.perf_counter()
        for image, query in pairs:
            predictor.predict(image, [query])
        alone.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        predictor.predict_batch([i for i, _ in pairs], [[q] for _, q in pairs])
        batched.append(time.perf_counter() - t0)
    ratio = statistics.median(alone) / statistics.median(batched)
    log(f"(a) model stages in-process, 8 requests: one at a time {1000 * statistics.median(alone):.1f} ms, "
        f"one batch {1000 * statistics.median(batched):.1f} ms -> at most {ratio:.2f}x from batching")  # fmt: skip
    return ratio


def hop_costs(base: str, one: bytes, image, rounds: int, calls: int) -> dict[str, float]:
    """(d) Serve's own cost, no model: p50 of an HTTP request (the same body) to an ingress that
    answers at once (the proxy hop), and what one handle call with the image adds (one graph hop)."""
    import httpx
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Echo:
        def __call__(self, array):
            return {"shape": list(array.shape)}

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class NoopIngress:
        def __init__(self, echo):
            self.echo = echo

        # No parameters: string annotations (this module's `from __future__ import annotations`)
        # could not be resolved in the replica, where this class arrives pickled by value.
        @api.post("/zero")
        async def zero(self):
            return {"ok": True}

        @api.post("/one")
        async def one(self):
            return await self.echo.remote(image)

    serve.run(NoopIngress.bind(Echo.bind()), name="hops", route_prefix="/hops")
    times: dict[str, list[float]] = defaultdict(list)
    with httpx.Client(timeout=60) as client:
        for _ in range(rounds):
            for path in ("zero", "one"):
                for i in range(calls + 3):
                    t0 = time.perf_counter()
                    client.post(f"{base}/hops/{path}", content=one).raise_for_status()
                    if i >= 3:
                        times[path].append(time.perf_counter() - t0)
    serve.delete("hops")
    zero, one_hop = (1000 * statistics.median(times[k]) for k in ("zero", "one"))
    log(f"(d) no model: HTTP to an ingress that answers at once p50 {zero:.1f} ms; one handle call with "
        f"the image adds {one_hop - zero:.1f} ms")  # fmt: skip
    return {"proxy_ms": zero, "handle_call_ms": one_hop - zero}


# ----- the benchmark -----------------------------------------------------------------------------
def upscaled(image, side: int):
    """A phantom image at radiograph size: what a chest X-ray upload weighs, with the same anatomy."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))


def large_images(url: str, small: list[bytes], large: list[bytes], args) -> dict[str, Window]:
    """(d) the same queries on 128² and on `--large-side`² PNG uploads, batching on, alternated."""
    windows: dict[str, Window] = defaultdict(Window)
    mb = statistics.mean(len(b) for b in large) / 1e6
    for r in range(args.rounds):
        for kind in ("small", "large") if r % 2 == 0 else ("large", "small"):
            w = asyncio.run(
                closed_loop(
                    url,
                    small if kind == "small" else large,
                    args.large_concurrency,
                    args.seconds,
                    args.warmup,
                    args.timeout,
                )
            )
            windows[kind].add(w)
            log(f"(d) round {r + 1} c={args.large_concurrency} {kind:>5} images: {w.rps:6.1f} req/s, "
                f"p50 {w.ms(50):7.1f} ms, errors {w.errors}, stages {w.stage_ms()}"
                + (f" (bodies {mb:.1f} MB)" if kind == "large" else ""))  # fmt: skip
    return windows


async def sequential(url: str, one: bytes, n: int, timeout: float) -> tuple[list[float], list[dict]]:
    """(b): `n` requests one after the other (after one unmeasured): their seconds and stage times."""
    import httpx

    seconds, timings = [], []
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=timeout) as client:
        await client.post(url, content=one, headers=headers)
        for _ in range(n):
            t0 = time.perf_counter()
            response = await client.post(url, content=one, headers=headers)
            seconds.append(time.perf_counter() - t0)
            timings.append(response.json()["timings"])
    return seconds, timings


@dataclass
class BatchingRuns:
    """(a) by (variant, concurrency): the windows of all rounds, and per round the requests per
    second, Serve's batches and the CPU milliseconds per request by process."""

    windows: dict[tuple[str, int], Window] = field(default_factory=lambda: defaultdict(Window))
    rps: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(list))
    batches: dict[tuple[str, int], list[dict]] = field(default_factory=lambda: defaultdict(list))
    cpu: dict[tuple[str, int], list[dict]] = field(default_factory=lambda: defaultdict(list))


@dataclass
class PlainResults:
    """What (a), (b) and (d) measured on the plain artifact."""

    batching: BatchingRuns
    overhead_ms: dict[str, float]
    ceiling: float
    large: dict[str, Window] | None  # (d): not run for lite
    hops: dict[str, float] | None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--smoke", action="store_true", help="a short run (seconds, not minutes)")
    parser.add_argument("--seconds", type=float, help="measured seconds per window (8 tiny, 90 lite)")
    parser.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each window (3 tiny, 30 lite)"
    )
    parser.add_argument(
        "--rounds", type=int, help="alternated repetitions of every comparison (2 tiny, 1 lite)"
    )
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels of (a)")
    parser.add_argument("--calls", type=int, help="requests per round and variant in (b) (40 tiny, 6 lite)")
    parser.add_argument("--large-side", type=int, default=2048, help="side of the PNG uploads of (d)")
    parser.add_argument("--large-concurrency", type=int, default=8, help="concurrency of (d)")
    parser.add_argument("--reject-concurrency", type=int, default=8, help="concurrency of (c)")
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.smoke:
        lite = args.preset == "lite"
        args.seconds, args.warmup, args.rounds, args.calls = (20.0, 10.0, 1, 2) if lite else (3.0, 1.5, 1, 8)
    args.levels = [int(x) for x in args.levels.split(",")]
    return args


def save_artifacts(tmp: Path, images, mix: list[tuple[int, str]], preset: str) -> tuple[str, str, float]:
    """The model's artifact, plain and with (c)'s calibration; and the share of the mix that
    the calibration's rule rejects in-process."""
    from medisee.artifact.model_dir import save_model_dir
    from medisee.config import load_config
    from medisee.model.build import build_from_config

    cfg = load_config(preset)
    model = build_from_config(cfg)
    plain = str(tmp / "plain")
    save_model_dir(model, cfg, plain)
    calibration, expected = reject_half(model, images, mix)
    calibrated = str(tmp / "calibrated")
    save_model_dir(model, cfg, calibrated, calibration=calibration)
    return plain, calibrated, expected


def reject_half(model, images, mix: list[tuple[int, str]]):
    """(c)'s calibration: the rule says "absent" when all three scores are below their thresholds.
    Compactness and purity thresholds out of reach (always below), strength at the mix's median:
    the lower half of the mix is rejected by the rule, the upper half is "uncertain" and goes
    through the decoder to the fallback (untrained weights: present)."""
    from medisee.infer import Predictor
    from medisee.verify.calibrate import CalibratedVerifier
    from medisee.verify.decision import Thresholds

    predictor = Predictor(model, early_reject=True)
    strength = []
    for index, query in mix:
        (screening,) = predictor.verifier.screen(predictor.mllm([images[index]], [[query]]))
        strength.append(screening.strength)
    ordered = sorted(strength)
    half = len(ordered) // 2
    cut = (ordered[half - 1] + ordered[half]) / 2
    calibration = CalibratedVerifier(thresholds=Thresholds(strength=cut, compactness=2.0, purity=2.0))
    expected = sum(s < cut for s in strength) / len(strength)
    log(f"(c) calibration: strength threshold {cut:.4f} (mix strengths {ordered[0]:.3f}..{ordered[-1]:.3f}), "
        f"rule 'absent' in-process for {expected:.0%} of the mix")  # fmt: skip
    return calibration, expected


def start_serve(timeout: float) -> tuple[str, int]:
    """Serve's HTTP proxy on a free loopback port: its base URL, and the port of Ray's metrics."""
    import ray
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": timeout})
    return f"http://127.0.0.1:{port}", ray._private.worker._global_node.metrics_export_port


def bench_plain(base: str, metrics_port: int, plain: str, images, true_pairs, args) -> PlainResults:
    """(a) batching on vs. off, (b) overhead at concurrency 1 and (d) large uploads and Serve's hops."""
    from ray import serve

    from medisee.artifact.model_dir import load_predictor

    timeout = {"request_timeout_s": args.app_timeout}
    urls = deploy(
        base, {"on": two_apps_args(plain, **timeout), "off": two_apps_args(plain, batching=False, **timeout)}
    )
    bodies = [body(images[i], q) for i, q in true_pairs]
    batching = measure_batching(urls, bodies, metrics_port, args)
    image, query = images[true_pairs[0][0]], true_pairs[0][1]
    one = body(image, query)
    local = load_predictor(plain, early_reject=True)
    seconds, timings = time_overhead(urls, one, local, image, query, args)
    ceiling = batching_ceiling(local, [(images[i], q) for i, q in true_pairs], args.ceiling_rounds)
    overhead_ms = overhead_from(seconds, timings, local, image, query)
    large = hops = None
    if args.large:
        large_bodies = [body(upscaled(images[i], args.large_side), q) for i, q in true_pairs]
        large = large_images(urls["on"], bodies, large_bodies, args)
    for name in ("on", "off"):
        serve.delete(name)
    if args.large:
        hops = hop_costs(base, one, image, args.rounds, 2 * args.calls)
    return PlainResults(batching, overhead_ms, ceiling, large, hops)


def measure_batching(urls: dict[str, str], bodies: list[bytes], metrics_port: int, args) -> BatchingRuns:
    """(a): every concurrency level, batching on and off alternated, the order flipped each round."""
    runs = BatchingRuns()
    for r in range(args.rounds):
        for level in args.levels:
            for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                before, cpu_before = batch_counters(metrics_port), cpu_seconds(name)
                w = asyncio.run(
                    closed_loop(urls[name], bodies, level, args.seconds, args.warmup, args.timeout)
                )
                runs.cpu[(name, level)].append(cpu_per_request(cpu_before, cpu_seconds(name), w.sent))
                time.sleep(2.5)
                after = batch_counters(metrics_port)
                runs.batches[(name, level)].append(batch_summary(before, after, name, w.sent))
                runs.windows[(name, level)].add(w)
                runs.rps[(name, level)].append(w.rps)
                log(f"(a) round {r + 1} c={level:>2} batching {name:>3}: {w.rps:6.1f} req/s, "
                    f"p50 {w.ms(50):6.1f} ms, p99 {w.ms(99):6.1f} ms, errors {w.errors}, "
                    f"stages {w.stage_ms()}, batches {runs.batches[(name, level)][-1]}")  # fmt: skip
                log(
                    f"    CPU ms per request: {runs.cpu[(name, level)][-1]}; load average {os.getloadavg()[0]:.1f}"
                )
    return runs


def time_overhead(urls: dict[str, str], one: bytes, local, image, query: str, args):
    """(b): one image and query, alternated: in-process, HTTP batching on, HTTP batching off.
    Returns the seconds per call and the stage times over HTTP, by "in-process" / variant."""
    seconds: dict[str, list[float]] = defaultdict(list)
    timings: dict[str, list[dict]] = defaultdict(list)
    local.predict(image, [query])
    for _ in range(args.rounds):
        for _ in range(args.calls):
            t0 = time.perf_counter()
            local.predict(image, [query])
            seconds["in-process"].append(time.perf_counter() - t0)
        for name in ("on", "off"):
            times, stages = asyncio.run(sequential(urls[name], one, args.calls, args.timeout))
            seconds[name] += times
            timings[name] += stages
    return seconds, timings


def overhead_from(seconds: dict, timings: dict, local, image, query: str) -> dict[str, float]:
    """(b): p50 over HTTP minus p50 in-process, by variant."""
    p50_local = 1000 * statistics.median(seconds["in-process"])
    local_stages = {k: round(1000 * v, 1) for k, v in local.predict(image, [query])[0].timings.items()}
    overhead_ms = {}
    for name in ("on", "off"):
        p50 = 1000 * statistics.median(seconds[name])
        overhead_ms[name] = p50 - p50_local
        stages = {
            k: round(1000 * statistics.median(t[k] for t in timings[name]), 1) for k in timings[name][0]
        }
        log(f"(b) batching {name:>3}: HTTP p50 {p50:.1f} ms (median stage times in the ingress {stages}), "
            f"in-process p50 {p50_local:.1f} ms ({local_stages}) -> overhead {overhead_ms[name]:.1f} ms")  # fmt: skip
    return overhead_ms


def bench_reject(base: str, calibrated: str, images, true_pairs, false_pairs, args) -> dict:
    """(c) early rejection on vs. off on the 50 % false mix, at concurrency 1 and --reject-concurrency:
    {(variant, concurrency): Window}."""
    urls = deploy(
        base,
        {
            "reject": two_apps_args(calibrated, request_timeout_s=args.app_timeout),
            "no_reject": two_apps_args(calibrated, early_reject=False, request_timeout_s=args.app_timeout),
        },
    )
    mix_bodies = [
        body(images[i], q) for i, q in (p for pair in zip(true_pairs, false_pairs, strict=True) for p in pair)
    ]
    reject: dict[tuple[str, int], Window] = defaultdict(Window)
    for r in range(args.rounds):
        for level in (1, args.reject_concurrency):
            for name in ("reject", "no_reject") if r % 2 == 0 else ("no_reject", "reject"):
                w = asyncio.run(
                    closed_loop(urls[name], mix_bodies, level, args.seconds, args.warmup, args.timeout)
                )
                reject[(name, level)].add(w)
                log(f"(c) round {r + 1} c={level} {name:>9}: {w.rps:6.1f} req/s, mean "
                    f"{1000 * statistics.mean(w.latencies):6.1f} ms, errors {w.errors}, stages {w.stage_ms()}, "
                    f"rule-absent {w.rejected}/{w.answers}")  # fmt: skip
    return reject


# ----- summary -----------------------------------------------------------------------------------
def log_run(args, run_started: float, load_start: tuple[float, float, float]) -> None:
    log(f"\nsummary ({args.rounds} alternated rounds of {args.seconds:g} s per window; "
        f"total {time.perf_counter() - run_started:.0f} s; machine load average at the start "
        f"{load_start[0]:.1f}, at the end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[2]:.1f} (15 min))")  # fmt: skip


def summarize_batching(runs: BatchingRuns, levels: list[int]) -> dict[int, float]:
    """(a)'s table; returns batching's speedup (req/s on over off) by concurrency."""
    log("(a) concurrency | batching on: req/s, p50, p99 | batching off: req/s, p50, p99 | speedup")
    speedup = {}
    for level in levels:
        on, off = runs.windows[("on", level)], runs.windows[("off", level)]
        speedup[level] = on.rps / off.rps
        log(f"    {level:>3} | {on.rps:6.1f}, {on.ms(50):6.1f} ms, {on.ms(99):6.1f} ms | {off.rps:6.1f}, "
            f"{off.ms(50):6.1f} ms, {off.ms(99):6.1f} ms | {speedup[level]:.2f}x "
            f"(per round on {[round(x, 1) for x in runs.rps[('on', level)]]}, off "
            f"{[round(x, 1) for x in runs.rps[('off', level)]]}; errors {on.errors}/{off.errors})")  # fmt: skip
    return speedup


def log_cpu(runs: BatchingRuns, levels: list[int]) -> None:
    log("(a) CPU milliseconds per request by process (mean of the rounds):")
    for level in levels:
        for name in ("on", "off"):
            rows = runs.cpu[(name, level)]
            roles = sorted(
                {role for r in rows for role in r}, key=lambda x: -sum(r.get(x, 0.0) for r in rows)
            )
            mean = {role: round(statistics.mean(r.get(role, 0.0) for r in rows), 1) for role in roles}
            log(f"    c={level:>2} batching {name:>3}: total {sum(mean.values()):.1f}: {mean}; "
                f"batches per round {runs.batches[(name, level)]}")  # fmt: skip


def log_large(large: dict[str, Window], args) -> None:
    small_w, large_w = large["small"], large["large"]
    log(f"(d) c={args.large_concurrency}: {args.large_side}² PNG {large_w.rps:.1f} req/s, p50 {large_w.ms(50):.1f} ms, "
        f"errors {large_w.errors} | 128² PNG {small_w.rps:.1f} req/s, p50 {small_w.ms(50):.1f} ms, "
        f"errors {small_w.errors}")  # fmt: skip


def summarize_reject(reject: dict, level: int, expected: float) -> tuple[float, float]:
    """(c) at `level`: the share of answers rejected by the rule, and the % less time per request."""
    on, off = reject[("reject", level)], reject[("no_reject", level)]
    saving = 100 * (1 - off.rps / on.rps)  # time per request saved at the same concurrency
    lat_on, lat_off = (statistics.mean(reject[(n, 1)].latencies) for n in ("reject", "no_reject"))
    share = on.rejected / max(on.answers, 1)
    log(f"(c) c={level}: {on.rps:.1f} req/s with early rejection vs {off.rps:.1f} without -> "
        f"{saving:.1f} % less time per request; c=1 mean latency {1000 * lat_on:.1f} vs {1000 * lat_off:.1f} ms "
        f"({100 * (1 - lat_on / lat_off):.1f} % less); rejected by the rule: {share:.0%} of the answers "
        f"(in-process expectation {expected:.0%})")  # fmt: skip
    return share, saving


def report_figures(plain: PlainResults, share: float, saving: float, speedup: dict[int, float], args) -> None:
    """Every figure, in the order of the module's docstring (lite: each name prefixed "lite_", (d)
    left out, p50/p99 and req/s of every level of (a) added); the last line is the headline."""
    prefix = "lite_" if args.preset == "lite" else ""

    def report(name: str, value: float | int, unit: str, target: float | None) -> None:
        print(json.dumps({"name": prefix + name, "value": value, "unit": unit, "target": target}), flush=True)

    report("serve_overhead_p50_ms", round(plain.overhead_ms["on"], 1), "ms", 15)
    report("serve_overhead_p50_ms_batching_off", round(plain.overhead_ms["off"], 1), "ms", 15)
    report("early_reject_rejected_share", round(100 * share, 1), "%", None)
    report("early_reject_saving", round(saving, 1), "%", None)
    report("model_batching_ceiling", round(plain.ceiling, 2), "x", None)
    if plain.large is None:
        for level in args.levels:
            on = plain.batching.windows[("on", level)]
            report(f"serve_rps_c{level}", round(on.rps, 3), "req/s", None)
            report(f"serve_p50_ms_c{level}", round(on.ms(50), 1), "ms", None)
            report(f"serve_p99_ms_c{level}", round(on.ms(99), 1), "ms", None)
        for level in args.levels[1:-1]:
            report(f"serve_batching_speedup_c{level}", round(speedup[level], 2), "x", None)
        top = args.levels[-1]
        report(f"serve_batching_speedup_c{top}", round(speedup[top], 2), "x", 2.5)
        return
    report("serve_proxy_p50_ms", round(plain.hops["proxy_ms"], 1), "ms", None)
    report("serve_handle_call_p50_ms", round(plain.hops["handle_call_ms"], 1), "ms", None)
    side, level = args.large_side, args.large_concurrency
    large_w, small_w = plain.large["large"], plain.large["small"]
    report(f"serve_large_{side}px_rps_c{level}", round(large_w.rps, 2), "req/s", None)
    report(f"serve_large_{side}px_p50_ms_c{level}", round(large_w.ms(50), 1), "ms", None)
    report(f"serve_small_128px_rps_c{level}", round(small_w.rps, 2), "req/s", None)
    report(f"serve_large_{side}px_errors", large_w.errors, "requests", 0)
    top = args.levels[-1]
    report(f"serve_batching_speedup_c{top}", round(speedup[top], 2), "x", 2.5)


def main() -> None:
    args = parse_args()
    import torch

    from medisee.raylib import ensure_ray

    ensure_ray(num_cpus=2)
    from ray import serve

    torch.set_num_threads(1)  # as in a replica (num_cpus < 1: OMP_NUM_THREADS=1)
    run_started, load_start = time.perf_counter(), os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    atexit.register(shutil.rmtree, tmp, True)
    images, true_pairs, false_pairs = request_mix(args.image_size)
    plain, calibrated, expected = save_artifacts(tmp, images, true_pairs + false_pairs, args.model_preset)
    base, metrics_port = start_serve(args.timeout)
    served = bench_plain(base, metrics_port, plain, images, true_pairs, args)
    reject = bench_reject(base, calibrated, images, true_pairs, false_pairs, args)
    serve.shutdown()

    log_run(args, run_started, load_start)
    speedup = summarize_batching(served.batching, args.levels)
    log_cpu(served.batching, args.levels)
    if served.large is not None:
        log_large(served.large, args)
    share, saving = summarize_reject(reject, args.reject_concurrency, expected)
    report_figures(served, share, saving, speedup, args)


if __name__ == "__main__":
    main()

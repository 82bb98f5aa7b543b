"""Batch scoring benchmark (CPU): `score_archive` on Ray Data vs. the Predictor, tiny or medisee-lite.

Side by side in one run, on the same archive of phantom PNGs at the preset's image size (128 px tiny,
256 px lite; template queries, 4 classes). `--preset lite` runs medisee-lite (SmolLM2 + LiteMedSAM,
real weights, untrained heads: throughput only) on a smaller archive (16 images, no large archive,
no memory check by default), with its own preset's settings:
  (a) the platform pipeline: `medisee.scoring.pipeline.score_archive` on a local Ray (started
      beforehand and timed apart; actor start-up and model loading are inside the timed call),
      records/s = result rows / wall seconds of `score_archive`;
  (b) the bare Predictor in this process on pre-decoded images, `predict_batch` over 8 images ×
      4 queries per call (the limit on this machine);
  (c) a naive loop: per image, per query, decode the PNG from disk and call `predictor.predict`
      with one image and one query (as the reference repository's inference script does).
Driver memory (`--memory-check`, on by default): (a) in a subprocess with its own Ray for the
small and the large archive; peak RSS of the driver process (getrusage, after `score_archive`).
(a) also runs on a larger archive (`--large-images`, 8,000 records by default), where the fixed
start-up (worker processes importing torch, model loading) is a smaller part of the run.
Details on stderr; last lines, one per target (the last is the headline):
  {"name": "driver_peak_rss_4k_over_1k", "value": <ratio>, "unit": "x", "target": 1.2}   (at most)
  {"name": "batch_vs_naive_loop_2000_records", "value": <ratio>, "unit": "x", "target": 3.0}
  {"name": "batch_vs_bare_predictor_2000_records", "value": <ratio>, "unit": "x", "target": 0.7}
  {"name": "batch_vs_naive_loop_8000_records", ...}  {"name": "batch_vs_bare_predictor_8000_records", ...}
  (the ratios: at least the target; (b) and (c) are per-record rates, measured on the 2,000)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = "liver,spleen,left_kidney,right_kidney"
QUERIES = f"template=Segment the {{class}}.;classes={CLASSES}"
PRESETS = {"tiny": "tiny", "lite": "medisee-lite"}
# Settings of (a) on top of the preset (see docs/benchmarks.md for the ones tried).
PIPELINE_SETTINGS = {
    "tiny": [
        "scoring.images_per_partition=64",
        "scoring.mllm_batch_images=16",
        "scoring.decoder_batch_images=16",
    ],
    "lite": [
        "scoring.images_per_partition=8",
        "scoring.mllm_batch_images=4",
        "scoring.decoder_batch_images=4",
    ],
}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def make_artifact(folder: Path, preset: str) -> Path:
    from medisee.artifact.model_dir import save_model_dir
    from medisee.config import load_config
    from medisee.model.build import build_from_config

    cfg = load_config(preset)
    save_model_dir(build_from_config(cfg), cfg, folder)
    return folder


def make_archive(folder: Path, images: int, size: int, seed: int = 7) -> Path:
    from PIL import Image

    from medisee.data.phantom import generate

    folder.mkdir(parents=True)
    for i in range(images):
        Image.fromarray(generate(seed=seed, index=i, size=size)[0]).save(folder / f"p{i:05d}.png")
    return folder


def pipeline_config(archive: Path, output: Path, artifact: Path, settings: list[str], preset: str):
    from medisee.config import load_config

    cfg = load_config(
        preset,
        [f"scoring.input={archive}", f"scoring.output={output}", f"scoring.model={artifact}", *settings],
    )
    cfg.scoring.queries = QUERIES  # as the CLI does (the value holds '=' and ';')
    return cfg


def run_pipeline(archive: Path, output: Path, artifact: Path, settings: list[str], preset: str) -> dict:
    """(a) once: score_archive on the running Ray; wall seconds and what the output shows."""
    from medisee.scoring.pipeline import score_archive

    cfg = pipeline_config(archive, output, artifact, settings, preset)
    started_wall, t0 = time.time(), time.perf_counter()
    summary = score_archive(cfg, log=lambda m: log("    " + m))
    seconds = time.perf_counter() - t0
    assert summary["reconciled"] and summary["errors"] == 0, summary
    # Commit markers: the writer stamps one per finished partition. From the first marker to the
    # last, start-up (actors, model loading, the first partition's fill) is behind us.
    markers = sorted(
        (p.stat().st_mtime, json.loads(p.read_text())["results"]) for p in (output / "_done").glob("*.json")
    )
    first_at = markers[0][0] - started_wall
    steady = None
    if len(markers) >= 3:
        span = markers[-1][0] - markers[0][0]
        steady = sum(n for _, n in markers[1:]) / span if span > 0 else None
    return {
        "seconds": seconds,
        "results": summary["results"],
        "records_s": summary["results"] / seconds,
        "first_partition_s": first_at,
        "steady_records_s": steady,
        "partitions": summary["partitions"],
        "stage_busy_s": {k: round(v, 2) for k, v in summary["stage_seconds"].items()},
        "verdicts": summary["verdicts"],
        "decoded": summary["decoded"],
    }


def log_pipeline(a: dict) -> None:
    log(
        f"    {a['records_s']:.1f} records/s ({a['results']} in {a['seconds']:.1f} s); "
        f"first partition committed after {a['first_partition_s']:.1f} s; steady state "
        f"(first to last commit) {a['steady_records_s'] or float('nan'):.1f} records/s; "
        f"stage busy s {a['stage_busy_s']}; decoded {a['decoded']}; verdicts {a['verdicts']}"
    )


def run_bare(predictor, images: list, queries: list[str], batch: int) -> tuple[float, dict]:
    """(b): predict_batch over pre-decoded images, `batch` images × all queries per call."""
    from collections import Counter

    predictor.predict_batch(images[:batch], [queries] * len(images[:batch]))  # warm-up
    verdicts: Counter = Counter()
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        for per_image in predictor.predict_batch(chunk, [queries] * len(chunk)):
            verdicts.update(r.verdict for r in per_image)
    return time.perf_counter() - t0, dict(verdicts)


def run_naive(predictor, paths: list[Path], queries: list[str]) -> tuple[float, dict]:
    """(c): one image and one query per call, the PNG decoded from disk for every call."""
    from collections import Counter

    from medisee.data.codec import decode_image

    predictor.predict(decode_image(paths[0].read_bytes()), queries[0])  # warm-up
    verdicts: Counter = Counter()
    t0 = time.perf_counter()
    for path in paths:
        for query in queries:
            (result,) = predictor.predict(decode_image(path.read_bytes()), query)
            verdicts[result.verdict] += 1
    return time.perf_counter() - t0, dict(verdicts)


# ----- driver memory: (a) in a subprocess ---------------------------------------------------------
def child_rss(args) -> None:
    """In the subprocess: start Ray, run score_archive, print the driver's peak RSS as JSON."""
    from medisee.console import quiet_logs

    quiet_logs()
    import ray

    from medisee.raylib import ensure_ray

    ensure_ray()
    import medisee.scoring.pipeline  # noqa: F401  (imports done before the window)

    before = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **proc_status()}
    window = reset_peak_rss()
    result = run_pipeline(
        Path(args.archive), Path(args.output), Path(args.model), args.settings, PRESETS[args.preset]
    )
    after = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **proc_status()}
    ray.shutdown()
    out = {
        "results": result["results"],
        "seconds": round(result["seconds"], 2),
        "rss_before_mib": before.get("VmRSS"),
        "peak_rss_before_mib": round(before["ru_maxrss_mib"], 1),
        "peak_rss_mib": round(after["ru_maxrss_mib"], 1),  # getrusage: the whole life of the process
        "rss_after_mib": after.get("VmRSS"),
        # the kernel's peak counter reset just before score_archive: the peak of that call alone
        "peak_rss_during_mib": after.get("VmHWM") if window else None,
    }
    print(json.dumps(out), flush=True)


def proc_status() -> dict:
    """VmRSS and VmHWM of this process in MiB (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_driver_rss(
    archive: Path, artifact: Path, work: Path, settings: list[str], preset: str, tag: str
) -> dict:
    ray_tmp = tempfile.mkdtemp(prefix="bpm", dir="/tmp")  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    cmd = [
        sys.executable, __file__, "--child-rss", "--archive", str(archive), "--model", str(artifact),
        "--output", str(work / f"out-rss-{tag}"), "--preset", preset, "--settings", *settings,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory-check subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--images", type=int, help="images in the archive (× 4 queries); 500 tiny, 16 lite")
    parser.add_argument(
        "--large-images", type=int,
        help="(a) also on an archive this large (start-up amortised); 0 to skip; 2000 tiny, 0 lite",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads of (b) and (c)")
    parser.add_argument("--batch-images", type=int, default=8, help="images per predict_batch call in (b)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of (a), (b), (c), order alternated")
    parser.add_argument("--variants", default="abc", help="which of (a), (b), (c) to run, e.g. 'a'")
    parser.add_argument(
        "--settings", nargs="*", help="scoring.* overrides of (a); default: the preset's PIPELINE_SETTINGS"
    )
    parser.add_argument(
        "--memory-check", action=argparse.BooleanOptionalAction, help="default: on for tiny, off for lite"
    )
    parser.add_argument("--memory-images", type=int, nargs=2, default=(250, 1000), metavar=("SMALL", "LARGE"))
    parser.add_argument("--smoke", action="store_true", help="24 and 48 images; memory check with 40 and 80")
    parser.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--archive", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lite = args.preset == "lite"
    defaults = dict(images=16 if lite else 500, large_images=0 if lite else 2000, memory_check=not lite)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.settings is None:
        args.settings = PIPELINE_SETTINGS[args.preset]
    preset = PRESETS[args.preset]
    if args.child_rss:
        child_rss(args)
        return
    if args.smoke:
        args.images, args.large_images, args.memory_images = (8, 0, (8, 16)) if lite else (24, 48, (40, 80))

    load_start = loadavg()
    # Our own Ray temp folder: isolated from any other Ray on the box, and its leftovers findable.
    ray_tmp = os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="bpr", dir="/tmp"))
    os.environ.pop("RAY_ADDRESS", None)
    from medisee.console import quiet_logs

    quiet_logs()
    import ray
    import torch

    from medisee.artifact.model_dir import load_predictor
    from medisee.config import PRESET_IMAGE_SIZES
    from medisee.data.codec import decode_image
    from medisee.raylib import ensure_ray
    from medisee.scoring.queries import parse_query_spec

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="batch-pipeline-"))
    try:
        t0 = time.perf_counter()
        size = PRESET_IMAGE_SIZES[preset]["sam_image_size"]
        artifact = make_artifact(work / "model", preset)
        archive = make_archive(work / "archive", args.images, size)
        large = make_archive(work / "archive-large", args.large_images, size) if args.large_images else None
        paths = sorted(archive.glob("*.png"))
        queries = parse_query_spec(QUERIES, str(archive)).template_queries
        images = [decode_image(p.read_bytes()) for p in paths]  # (b) works on pre-decoded images
        records = len(paths) * len(queries)
        log(
            f"{len(paths)} images × {len(queries)} queries = {records} records; archive and model made in "
            f"{time.perf_counter() - t0:.1f} s; load average {load_start}"
        )
        log(f"(a) settings: {preset} + {' '.join(args.settings)}; (b)/(c) torch threads {args.threads}")

        predictor = load_predictor(str(artifact), early_reject=True)
        t0 = time.perf_counter()
        ensure_ray()
        ray_start_s = time.perf_counter() - t0
        log(
            f"Ray started in {ray_start_s:.1f} s (not counted in (a)); {ray.cluster_resources().get('CPU')} CPUs"
        )

        a_runs, a_large, b_runs, c_runs = [], [], {}, []
        for rep in range(args.reps):
            order = [v for v in "abc" if v in args.variants]
            for name in order if rep % 2 == 0 else order[::-1]:
                if name == "a":
                    log(f"[rep {rep + 1}] (a) score_archive ...")
                    a = run_pipeline(archive, work / f"out-{rep}", artifact, args.settings, preset)
                    assert a["results"] == records, (a["results"], records)
                    a_runs.append(a)
                    log_pipeline(a)
                    if large and rep == 0:
                        log(f"[rep {rep + 1}] (a) score_archive on {args.large_images} images ...")
                        a_large.append(
                            run_pipeline(large, work / "out-large", artifact, args.settings, preset)
                        )
                        log_pipeline(a_large[-1])
                elif name == "b":  # at the given threads and at 1 (2 threads suffer most from a busy box)
                    for threads in sorted({args.threads, 1}, reverse=True):
                        torch.set_num_threads(threads)
                        seconds, verdicts = run_bare(predictor, images, queries, args.batch_images)
                        b_runs.setdefault(threads, []).append(records / seconds)
                        log(
                            f"[rep {rep + 1}] (b) bare Predictor, {threads} torch thread(s): "
                            f"{records / seconds:.1f} records/s; {verdicts}"
                        )
                    torch.set_num_threads(args.threads)
                else:
                    seconds, verdicts = run_naive(predictor, paths, queries)
                    c_runs.append(records / seconds)
                    log(f"[rep {rep + 1}] (c) naive loop: {records / seconds:.1f} records/s; {verdicts}")
        ray.shutdown()

        rss = None
        if args.memory_check:
            small, large = args.memory_images
            rss = {}
            for n in (small, large):
                folder = make_archive(work / f"archive-{n}", n, size)  # made here: not in the child's RSS
                rss[n] = measure_driver_rss(folder, artifact, work, args.settings, args.preset, str(n))
                log(f"driver memory, {n} images × {len(queries)} queries: {rss[n]}")
    finally:
        ray.shutdown()
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    a_rps = statistics.median(r["records_s"] for r in a_runs) if a_runs else float("nan")
    b_by_threads = {t: statistics.median(v) for t, v in b_runs.items()}
    b_rps = max(b_by_threads.values()) if b_runs else float("nan")  # the limit: the better thread count
    c_rps = statistics.median(c_runs) if c_runs else float("nan")
    steady = [r["steady_records_s"] for r in a_runs if r["steady_records_s"]]
    details = {
        "preset": preset,
        "records": records,
        "settings": args.settings,
        "threads_b_c": args.threads,
        "reps": args.reps,
        "ray_start_s": round(ray_start_s, 1),
        "a_records_s": round(a_rps, 1),
        "a_seconds": [round(r["seconds"], 1) for r in a_runs],
        "a_first_partition_s": [round(r["first_partition_s"], 1) for r in a_runs],
        "a_steady_records_s": round(statistics.median(steady), 1) if steady else None,
        "a_stage_busy_s": a_runs[-1]["stage_busy_s"] if a_runs else None,
        "a_large_records": a_large[0]["results"] if a_large else None,
        "a_large_records_s": round(a_large[0]["records_s"], 1) if a_large else None,
        "a_large_seconds": round(a_large[0]["seconds"], 1) if a_large else None,
        "a_large_first_partition_s": round(a_large[0]["first_partition_s"], 1) if a_large else None,
        "b_records_s": round(b_rps, 1),
        "b_records_s_by_threads": {t: round(v, 1) for t, v in b_by_threads.items()},
        "c_records_s": round(c_rps, 1),
        "load_average_start": load_start,
        "load_average_end": loadavg(),
    }
    if rss:
        small, large = args.memory_images
        details["driver_rss_records"] = {n: rss[n]["results"] for n in (small, large)}
        details["driver_peak_rss_mib"] = {n: rss[n]["peak_rss_mib"] for n in (small, large)}
        details["driver_peak_rss_during_score_archive_mib"] = {
            n: rss[n]["peak_rss_during_mib"] for n in (small, large)
        }
    log(json.dumps(details))
    lines = []
    if rss:
        key = "peak_rss_during_mib" if rss[small]["peak_rss_during_mib"] else "peak_rss_mib"
        ratio = rss[large][key] / rss[small][key]
        lines.append(("driver_peak_rss_4k_over_1k", ratio, 1.2))
    n = records
    lines += [(f"batch_vs_naive_loop_{n}_records", a_rps / c_rps, 3.0)]
    lines += [(f"batch_vs_bare_predictor_{n}_records", a_rps / b_rps, 0.7)]
    if a_large:  # the headline: an archive large enough that start-up is not most of the run
        big, big_rps = a_large[0]["results"], a_large[0]["records_s"]
        lines += [(f"batch_vs_naive_loop_{big}_records", big_rps / c_rps, 3.0)]
        lines += [(f"batch_vs_bare_predictor_{big}_records", big_rps / b_rps, 0.7)]
    for name, value, target in lines:
        name = f"lite_{name}" if lite else name
        print(json.dumps({"name": name, "value": round(value, 3), "unit": "x", "target": target}), flush=True)


if __name__ == "__main__":
    main()

"""Prediction benchmark (tiny preset, CPU): what batching buys at inference.

Side by side in one run, the variants alternated repetition by repetition, medians reported:
  (a) teacher-forced Predictor: 4 queries about one image in one `predict` call (the image encoded
      once) vs. one query per call;
  (b) generate mode, MLLM stage: 8 (image, query) pairs in one padded batch vs. one at a time.
Last lines, one per figure (the last is the headline):
  {"name": "generate_batch8", "value": <ratio>, "unit": "x", "target": 2.0}
  {"name": "predict_queries_per_image", "value": <ratio>, "unit": "x", "target": 2.0}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

QUERIES = [
    "Can you segment the liver in this image?",
    "Where is the spleen?",
    "Please outline the left kidney.",
    "Segment the aorta.",
    "Which organ stores bile? Segment it.",
    "Show me the pancreas.",
    "Can you find the stomach here?",
    "Segment the right kidney in this slice.",
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def side_by_side(variants: dict, reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each repetition of each variant; the order alternates every repetition."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(timed(variants[name]))
    return times


def compare(label: str, queries: int, fast: tuple[str, list[float]], slow: tuple[str, list[float]]) -> float:
    """Prints queries/s of both variants (median, and best repetition); returns the ratio of medians."""
    (fast_name, fast_s), (slow_name, slow_s) = fast, slow
    ratio = statistics.median(slow_s) / statistics.median(fast_s)
    print(
        f"{label}: {fast_name} {queries / statistics.median(fast_s):.1f} queries/s "
        f"(best {queries / min(fast_s):.1f}), {slow_name} {queries / statistics.median(slow_s):.1f} "
        f"(best {queries / min(slow_s):.1f}) -> {ratio:.2f}x (best vs. best {min(slow_s) / min(fast_s):.2f}x)"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from medisee.data.phantom import generate
    from medisee.infer.mllm_stage import MLLMStage
    from medisee.infer.predictor import Predictor
    from medisee.model import build_model

    torch.set_num_threads(args.threads)
    model = build_model("tiny", seed=0).eval()
    predictor = Predictor(model, early_reject=False)
    images = [generate(0, i, 128)[0] for i in range(8)]
    image, four = images[0], QUERIES[:4]

    print(f"torch threads: {torch.get_num_threads()}; {args.reps} alternated repetitions, medians")
    # (a) teacher-forced, 4 queries about one image
    a = side_by_side(
        {
            "one call": lambda: predictor.predict(image, four),
            "one query per call": lambda: [predictor.predict(image, q) for q in four],
        },
        args.reps,
        args.warmup,
    )
    predict_ratio = compare("(a) teacher-forced, 4 queries/image", len(four), *a.items())

    # (b) generate mode, 8 (image, query) pairs
    stage = MLLMStage(model, mode="generate", max_new_tokens=args.max_new_tokens)
    pairs = list(zip(images, QUERIES, strict=True))
    b = side_by_side(
        {
            "batch 8": lambda: stage(images, [[q] for q in QUERIES]),
            "one at a time": lambda: [stage([im], [[q]]) for im, q in pairs],
        },
        args.reps,
        args.warmup,
    )
    label = f"(b) generate, max_new_tokens={args.max_new_tokens}"
    generate_ratio = compare(label, len(pairs), *b.items())
    batched = [e.answer for e in stage(images, [[q] for q in QUERIES])]
    single = [stage([im], [[q]])[0].answer for im, q in pairs]
    same = sum(x == y for x, y in zip(batched, single, strict=True))
    tokens = [len(model.text.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in single]
    print(
        f"    answers identical batched vs. single: {same}/{len(pairs)}; answer tokens {min(tokens)}-{max(tokens)}"
    )
    for name, value in (("generate_batch8", generate_ratio), ("predict_queries_per_image", predict_ratio)):
        print(json.dumps({"name": name, "value": round(value, 2), "unit": "x", "target": 2.0}))


if __name__ == "__main__":
    main()

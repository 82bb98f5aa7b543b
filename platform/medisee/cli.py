"""The `medisee` command."""

from __future__ import annotations

import json
import os
import sys
from typing import NoReturn

import typer
from typer.core import TyperGroup

from medisee.raylib import apply_env_defaults

# What a user can get wrong (a model reference, a path, a store): looked up in sys.modules once raised,
# since importing them (torch, mlflow) costs seconds that --help should not pay. Any OSError too.
USER_ERRORS = (
    ("medisee.model.checkpoint", "CheckpointError"),
    ("medisee.tracking", "TrackingStoreError"),
    ("medisee.tracking", "ModelReferenceError"),
    ("medisee.storage", "UnsafeKey"),
    ("medisee.scoring.plan", "PlanError"),
    ("medisee.scoring.queries", "QuerySpecError"),
    ("medisee.scoring.writer", "JobMismatch"),
    ("medisee.artifact.golden", "GoldenMismatch"),
    ("medisee.data.prepare", "PrepareError"),
    ("medisee.config", "ConfigError"),
    ("mlflow.exceptions", "MlflowException"),
    ("yaml", "YAMLError"),  # an override that is not YAML
)
TRACEBACK_ENV = "MEDISEE_TRACEBACK"  # set to 1: user errors raise with their traceback instead
MAX_ERROR_CHARS = 600


class BadInput(ValueError):
    """An input the command cannot use (named in the message)."""


def fail(message: str, code: int = 2) -> NoReturn:
    """`message` in red as the command's one line on stderr, then exit `code` (2: a bad input)."""
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(code) from None


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, BadInput)):
        return True
    classes = (getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS)
    return any(cls is not None and isinstance(exc, cls) for cls in classes)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    mlflow = sys.modules.get("mlflow")
    if isinstance(exc, getattr(sys.modules.get("mlflow.exceptions"), "MlflowException", ())) and mlflow:
        text += f" (tracking store {mlflow.get_tracking_uri()})"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class OneLineErrors(TyperGroup):
    """Every command: a bad model reference, a missing path or an unreachable store is one line on
    stderr and exit 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not is_user_error(exc) or os.environ.get(TRACEBACK_ENV) == "1":
                raise
            fail(f"{ctx.invoked_subcommand or 'medisee'}: {one_line(exc)}")


app = typer.Typer(
    cls=OneLineErrors,
    help="MediSee platform: prepare data, train, batch-score and serve on Ray.",
    no_args_is_help=True,
)

CONFIG_HELP = "Preset name (tiny, medisee-7b) or YAML file."
OVERRIDE_HELP = "Dotted overrides, e.g. trainer.num_workers=4."


def _config(config: str | None, overrides: list[str] | None):
    from medisee.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        fail(f"config error: {exc}")


def print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import version

    typer.echo(f"medisee {version('medisee')}")
    raise typer.Exit()


@app.callback()
def setup(
    _version: bool = typer.Option(
        False, "--version", callback=print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Runs before every command (not for --help or --version)."""
    apply_env_defaults()


@app.command()
def doctor(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """Print versions, Ray / MLflow / storage settings and what could be reached."""
    from medisee.doctor import diagnose

    typer.echo(json.dumps(diagnose(_config(config, overrides)), indent=2))


stack_app = typer.Typer(
    help="A local stack on loopback: S3 (moto), MLflow (artifacts on that S3) and a Ray head.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
STACK_DIR_HELP = "Stack folder (default: $MEDISEE_STACK_DIR, else .medisee/stack)."


@stack_app.command("up")
def stack_up(
    directory: str | None = typer.Option(None, "--dir", help=STACK_DIR_HELP),
    num_cpus: int | None = typer.Option(None, help="CPUs of the Ray head (default: the machine's)."),
) -> None:
    """Start the stack, or report that it is up (restarting a piece that died); writes stack.env."""
    import shlex

    from medisee import stack

    try:
        state = stack.up(directory, num_cpus=num_cpus, log=lambda m: typer.echo(m, err=True))
    except stack.StackError as exc:
        fail(f"stack up: {exc}", code=1)
    env_file = shlex.quote(str(stack.stack_dir(directory) / stack.ENV_FILE))
    typer.echo(f"stack up: point commands at it with\n  source {env_file}\nstop it with: medisee stack down")
    typer.echo(f"Ray dashboard {state.dashboard_url}, MLflow {state.url('mlflow')}", err=True)


@stack_app.command("down")
def stack_down(directory: str | None = typer.Option(None, "--dir", help=STACK_DIR_HELP)) -> None:
    """Stop every server of the stack (by PID and session; other Ray instances are left alone)."""
    from medisee import stack

    try:
        stack.down(directory, log=lambda m: typer.echo(m, err=True))
    except stack.StackError as exc:
        fail(f"stack down: {exc}", code=1)


@stack_app.command("status")
def stack_status(directory: str | None = typer.Option(None, "--dir", help=STACK_DIR_HELP)) -> None:
    """PIDs, ports, URLs and health of the stack's servers as JSON; exit 1 unless all answer."""
    from medisee import stack

    report = stack.status(directory)
    typer.echo(json.dumps(report, indent=2))
    if not report["running"]:
        raise typer.Exit(1)


@app.command()
def prepare(
    fmt: str = typer.Argument(
        ...,
        metavar="FORMAT",
        help="sa-med2d | mlmr-sd | sam-med2d-demo | image-folder | nifti | dicom | phantom",
    ),
    input_uri: str = typer.Option(
        "-", "--input", "-i", help="Input URI (local path or s3://); ignored by phantom."
    ),
    output_uri: str = typer.Option(..., "--output", "-o", help="Output URI for shards and manifest."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    modality: str = typer.Option("unknown", help="Modality for layouts that do not carry one."),
    mask_format: str = typer.Option("png", help="png or rle"),
    executor: str = typer.Option("ray", help="ray (default) or local (in-process, for debugging)"),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """Convert a dataset layout into Parquet shards with a manifest and a quarantine table.

    Exits 2, writing nothing, on an unknown format or an input that is missing or holds nothing
    the format recognises; exits 1 after writing the quarantine when every record was bad.
    """
    from medisee import storage
    from medisee.data.prepare import PrepareError
    from medisee.data.prepare import prepare as run_prepare

    cfg = _config(config, overrides)
    try:
        manifest = run_prepare(
            fmt,
            input_uri,
            output_uri,
            cfg.prepare,
            storage.StorageSettings.from_config(cfg.storage),
            executor=executor,
            mask_format=mask_format,
            modality=modality,
        )
    except PrepareError as exc:
        fail(f"prepare: {exc}")
    summary = {k: v for k, v in manifest.items() if k not in ("shards", "schema", "prepare")}
    summary["shards"] = len(manifest["shards"])
    typer.echo(json.dumps(summary, indent=2))
    if not manifest["rows_written"]:
        quarantine = storage.join(output_uri, manifest["quarantine"])
        fail(
            f"prepare: no rows written from {fmt} input {input_uri}: "
            f"all {manifest['rows_quarantined']} rows quarantined, see {quarantine}",
            code=1,
        )


@app.command()
def train(
    config: str | None = typer.Option("tiny", "--config", "-c", help=CONFIG_HELP),
    register: str | None = typer.Option(None, help="Register the final model under this name."),
    alias: str | None = typer.Option(None, help="Alias to set on the registered version (e.g. candidate)."),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """Run (or resume, by run name) the LoRA / full fine-tune recipe on Ray Train."""
    from medisee.console import quiet_logs
    from medisee.train.trainer import run_training

    quiet_logs()
    cfg = _config(config, overrides)
    if not cfg.data.sources:
        fail("data.sources is empty: give e.g. 'data.sources={phantom: /path/to/shards}'")
    from medisee.storage import StorageSettings

    for uri in cfg.data.sources.values():
        _require_input(uri, StorageSettings.from_config(cfg.storage))
    typer.echo(json.dumps(run_training(cfg, register, alias), default=str))


def _require_input(uri: str, settings) -> None:
    """Refuse a missing input before a model is loaded for it."""
    from medisee import storage

    if not storage.exists(uri, settings):
        raise BadInput(f"input {uri} does not exist")


MODEL_HELP = "Model artifact: models:/name@alias, models:/name/N, runs:/id/model, s3://... or a local folder."


def _load_model(model_uri: str, cfg, parts=None):
    from medisee.artifact.model_dir import load_model_dir
    from medisee.storage import StorageSettings

    return load_model_dir(
        model_uri,
        settings=StorageSettings.from_config(cfg.storage),
        tracking_uri=cfg.tracking.uri,
        **({"parts": parts} if parts else {}),
    )


def _pin_store(cfg, *model_uris: str | None) -> None:
    """Resolve the tracking store here, on the submitting side, when a model reference needs it: the
    stages of a job get the absolute store, and a missing or unreachable one is refused before Ray starts."""
    from medisee import tracking

    if any(str(uri or "").startswith(("models:/", "runs:/")) for uri in model_uris):
        cfg.tracking.uri = tracking.existing_store(cfg.tracking.uri)


def _verifier_inputs(model_uri: str, data_uri: str, split: str, limit: int, config, overrides):
    from medisee.infer.rows import collect_evidence
    from medisee.storage import StorageSettings
    from medisee.train.evaluate import load_eval_rows

    cfg = _config(config, overrides)
    settings = StorageSettings.from_config(cfg.storage)
    if not model_uri.startswith(("models:/", "runs:/")):
        raise BadInput(
            f"{model_uri} is not an MLflow model: give runs:/ or models:/ (the calibration is stored there)"
        )
    _require_input(data_uri, settings)
    loaded = _load_model(model_uri, cfg)
    rows = load_eval_rows(data_uri, split, settings, limit=limit, include_false=True)
    if not rows:
        raise BadInput(f"no labelled rows of split {split!r} under {data_uri}")
    evidence, present, preds = collect_evidence(loaded.model, rows)
    return cfg, settings, loaded, evidence, present, rows, preds


def _run_id(loaded, model_uri: str) -> str:
    if loaded.run_id is None:
        fail(f"{model_uri} is not an MLflow model: give runs:/ or models:/")
    return loaded.run_id


@app.command()
def calibrate(
    model_uri: str = typer.Option(
        ..., "--model", help="models:/name@alias, models:/name/N or runs:/id/model"
    ),
    data_uri: str = typer.Option(..., "--data", help="Prepared shards with true and false queries."),
    split: str = typer.Option("val", help="Split to calibrate on."),
    limit: int = typer.Option(1000, help="At most this many rows."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """Fit the verifier's thresholds and fallback on a validation split; store them in the model artifact."""
    from medisee.artifact.calibration import save_calibration
    from medisee.verify.calibrate import calibrate as fit

    cfg, settings, loaded, evidence, present, rows, preds = _verifier_inputs(
        model_uri, data_uri, split, limit, config, overrides
    )
    verifier = fit(evidence, present)
    save_calibration(cfg, settings, _run_id(loaded, model_uri), verifier)
    typer.echo(verifier.to_json())


@app.command("evaluate-verifier")
def evaluate_verifier_cmd(
    model_uri: str = typer.Option(
        ..., "--model", help="models:/name@alias, models:/name/N or runs:/id/model"
    ),
    data_uri: str = typer.Option(..., "--data", help="Prepared shards with true and false queries."),
    split: str = typer.Option("test", help="Split to evaluate on."),
    limit: int = typer.Option(1000, help="At most this many rows."),
    output: str | None = typer.Option(None, help="Write the Markdown table here."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """Rejection benchmark: accuracy, rejection P/R/F1, balanced accuracy, AUROCs, share sent to the judge."""
    from medisee.artifact.calibration import save_calibration
    from medisee.verify.evaluate import evaluate_verifier, markdown_table

    cfg, settings, loaded, evidence, present, rows, preds = _verifier_inputs(
        model_uri, data_uri, split, limit, config, overrides
    )
    verifier = loaded.calibration
    judge = _judge(cfg)
    verdicts = None
    if judge is not None:
        from medisee.verify.judge import judged_verdicts

        similarities = [p.similarity for p in preds]
        verdicts = judged_verdicts(
            judge, verifier, evidence, rows, similarities, loaded.model.clip_size,
            loaded.model.shares_image_encoder,
        )  # fmt: skip
    report = evaluate_verifier(verifier, evidence, present, verdicts)
    save_calibration(cfg, settings, _run_id(loaded, model_uri), verifier, report)
    table = markdown_table(report)
    if output:
        from pathlib import Path

        Path(output).write_text(table)
    typer.echo(table)


def _judge(cfg):
    """The configured judge for uncertain cases, or None."""
    from medisee.verify.judge import judge_from_config

    return judge_from_config(cfg.verifier)


@app.command()
def predict(
    model_uri: str = typer.Option(..., "--model", help=MODEL_HELP),
    image: str = typer.Option(
        ..., "--image", help="An image file (PNG, JPEG, TIFF; 8/16-bit) or a DICOM file."
    ),
    query: list[str] = typer.Option(..., "--query", "-q", help="A question about the image (repeatable)."),
    mode: str = typer.Option(
        "teacher_forced", help="teacher_forced (fixed answer) or generate (answer text)."
    ),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """Answer questions about one image: one JSON line per query (answer, verdict, box, mask as COCO RLE)."""
    from medisee.artifact.model_dir import load_predictor
    from medisee.storage import StorageSettings

    cfg = _config(config, overrides)
    try:
        pixels = _read_image(image, cfg)
    except Exception as exc:
        fail(f"predict: cannot read image {image}: {one_line(exc)}")
    predictor = load_predictor(
        model_uri,
        settings=StorageSettings.from_config(cfg.storage),
        tracking_uri=cfg.tracking.uri,
        judge=_judge(cfg),
        mode=mode,
    )
    for result in predictor.predict(pixels, query):
        typer.echo(json.dumps(result_json(result, predictor.artifact)))


def _read_image(path: str, cfg):
    """uint8 H×W×3 from an image file, or the first frame of a DICOM file (modality LUT + window)."""
    from medisee import storage
    from medisee.data.codec import BadRecord, decode_image

    data = storage.read_bytes(path, storage.StorageSettings.from_config(cfg.storage))
    try:
        return decode_image(data, cfg.prepare.max_image_pixels)
    except BadRecord as exc:
        if exc.reason == "too_large":
            raise
        from medisee.data.bounded import dicom_first_frame

        return dicom_first_frame(data, cfg.prepare.max_image_pixels, cfg.prepare.max_dicom_bytes)


def result_json(result, loaded) -> dict:
    """A QueryResult as JSON: the mask as COCO RLE, no similarity map."""
    from medisee.data.codec import mask_to_rle

    out = {k: v for k, v in vars(result).items() if k not in ("mask", "similarity")}
    out["mask_rle"] = None if result.mask is None else json.loads(mask_to_rle(result.mask))
    out["model"] = {"ref": loaded.ref, "run_id": loaded.run_id, "sha256": loaded.sha256}
    return out


@app.command()
def export(
    model_uri: str = typer.Option(..., "--model", help=MODEL_HELP),
    output: str = typer.Option(..., "--output", "-o", help="Local folder for the export."),
    max_shard_size: str = typer.Option("2GB", help="Largest safetensors shard of the LLaVA part."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """LoRA merged: a transformers LLaVA folder + tokenizer, SAM and heads as safetensors, sha256 of every file."""
    from medisee.model.export import export_model

    cfg = _config(config, overrides)
    loaded = _load_model(model_uri, cfg)
    try:
        report = export_model(loaded.model, output, max_shard_size=max_shard_size)
    except FileExistsError:
        fail(f"{output} is not empty: give a new or empty folder")
    typer.echo(json.dumps(report, indent=2, default=str))


@app.command()
def score(
    input_uri: str = typer.Option(
        ..., "--input", "-i", help="Folder or s3:// prefix: shards, images, DICOM, NIfTI (may be mixed)."
    ),
    queries: str = typer.Option(
        "records",
        "--queries",
        help="records (shards) | a .jsonl manifest | 'template=Segment the {class}.;classes=liver,spleen'",
    ),
    model_uri: str | None = typer.Option(
        None, "--model", help=MODEL_HELP + " Default with --via-serve: the app's."
    ),
    output_uri: str = typer.Option(..., "--output", "-o", help="Output folder or s3:// prefix."),
    via_serve: str | None = typer.Option(
        None,
        "--via-serve",
        help="Name of a running Serve application to send the images to (no second model copy).",
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help=CONFIG_HELP + " The model's own facts come from its artifact."
    ),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. scoring.mllm_actors=2."),
) -> None:
    """Batch-score an archive on Ray Data: results and errors as Parquet per input partition, exactly once.

    Run it again with the same output to resume after a failure: finished partitions are kept.
    Exits 2 on a bad input, query spec, model or output; 1 when the counts do not reconcile.
    """
    from medisee.console import quiet_logs
    from medisee.storage import StorageSettings

    quiet_logs()
    cfg = _config(config, [*(overrides or []), f"scoring.input={input_uri}", f"scoring.output={output_uri}"])
    cfg.scoring.queries, cfg.scoring.model, cfg.scoring.via_serve = queries, model_uri, via_serve
    if not (model_uri or via_serve):
        fail("score: give --model, or --via-serve APP to use a running application's")
    _pin_store(cfg, model_uri)  # before the pipeline's imports (torch, Ray Data): a refusal is quick
    from medisee.scoring.pipeline import score_archive

    summary = score_archive(
        cfg, StorageSettings.from_config(cfg.storage), log=lambda m: typer.echo(m, err=True)
    )
    typer.echo(summary_table(summary), err=True)
    typer.echo(json.dumps(summary))
    if not summary["reconciled"]:
        fail("score: inputs != results + errors (see summary.json)", code=1)


def summary_table(summary: dict) -> str:
    lines = [
        f"inputs {summary['inputs']} = results {summary['results']} + errors {summary['errors']}: "
        + ("reconciled" if summary["reconciled"] else "NOT reconciled"),
        f"partitions {summary['partitions_done']}/{summary['partitions']}, images {summary['images']}, "
        f"{summary['seconds']:.1f} s, {summary['results_per_second'] or 0:.2f} results/s",
        "verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["verdicts"].items())),
        "errors by reason: "
        + (", ".join(f"{k} {v}" for k, v in sorted(summary["error_reasons"].items())) or "none"),
        "stage busy seconds: "
        + ", ".join(f"{k[2:-2]} {v:.1f}" for k, v in sorted(summary["stage_seconds"].items())),
    ]
    if summary["skipped"]:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items())))
    return "\n".join(lines)


@app.command()
def evaluate(
    model_uri: str = typer.Option(..., "--model", help=MODEL_HELP),
    data_uri: str = typer.Option(..., "--data", help="Prepared shards (the output of medisee prepare)."),
    split: str = typer.Option("test", help="Which split to score."),
    output_uri: str = typer.Option(
        None, "--output", "-o", help="Where the report goes (default .medisee/eval/<model>-<split>)."
    ),
    worst: int = typer.Option(8, help="Overlays of this many worst cases in the report."),
    config: str | None = typer.Option("tiny", "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """The paper's tables on a labelled split (by query kind, per class, verifier rejection,
    presence-aware), a Markdown report with the worst cases, all logged to MLflow.

    Refuses (exit 2) a model that does not load completely or does not reproduce its golden pair.
    """
    from medisee.artifact.golden import GoldenMismatch
    from medisee.console import quiet_logs
    from medisee.model.checkpoint import CheckpointError
    from medisee.scoring.evaluate import evaluate_model
    from medisee.scoring.plan import slug
    from medisee.storage import StorageSettings

    quiet_logs()
    cfg = _config(config, [*(overrides or []), f"scoring.model={model_uri}"])
    output_uri = output_uri or f".medisee/eval/{slug(model_uri)}-{split}"
    _require_input(data_uri, StorageSettings.from_config(cfg.storage))
    try:
        report = evaluate_model(
            cfg, StorageSettings.from_config(cfg.storage), data_uri, split, output_uri, worst,
            log=lambda m: typer.echo(m, err=True),
        )  # fmt: skip
    except (CheckpointError, GoldenMismatch) as exc:
        fail(f"evaluate: refused: {one_line(exc)}")
    from medisee import storage

    typer.echo(storage.read_text(storage.join(output_uri, "report.md")), err=True)
    typer.echo(json.dumps({"report": storage.join(output_uri, "report.md"), "mlflow_run_id": report["mlflow_run_id"],
                           **{k: report["segmentation"].get(k) for k in ("dice", "giou", "ciou", "box_iou", "acc50")}}))  # fmt: skip


@app.command("serve")
def serve_cmd(
    model_uri: str = typer.Option(..., "--model", help=MODEL_HELP),
    extra_model: list[str] | None = typer.Option(
        None, help="Another version a request may ask for (repeatable)."
    ),
    host: str = typer.Option("127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)."),
    port: int = typer.Option(8000, help="HTTP port."),
    settings: list[str] | None = typer.Argument(
        None, help="Application settings as key=value, e.g. mllm.num_replicas=2 batching=false (see AppArgs)."
    ),
) -> None:
    """Serve a model locally: the Ray Serve graph behind http://HOST:PORT (API at /docs, web page at /).

    Needs API keys ($MEDISEE_API_KEYS or api_keys_file=PATH); allow_anonymous=true serves without
    them, on a loopback host only. Exits 2 otherwise, and on a model that cannot be read.
    """
    import yaml
    from ray import serve

    from medisee.config import ConfigError, set_nested
    from medisee.raylib import ensure_ray
    from medisee.serving.app import build_app
    from medisee.serving.args import AppArgs

    tree: dict = {"model": model_uri, "extra_models": list(extra_model or [])}
    try:
        for item in settings or []:
            key, _, raw = item.partition("=")
            set_nested(tree, key.strip(), yaml.safe_load(raw))
        args = AppArgs.model_validate(tree)
    except (ConfigError, ValueError) as exc:
        fail(f"serve: {exc}")
    args, auth_mode = refuse_open_serving(args, host)
    args = _checked_versions(args)
    typer.echo(f"serve: {auth_mode}", err=True)
    ensure_ray()
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": args.request_timeout_s + 5})
    serve.run(build_app(args), name="medisee", route_prefix="/", blocking=False)
    typer.echo(f"serving {model_uri} on http://{host}:{port} (API docs at /docs); Ctrl-C to stop", err=True)
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def is_loopback(host: str) -> bool:
    """Only this machine can connect (`localhost`, 127.0.0.0/8, ::1); a name is not resolved here."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_open_serving(args, host: str):
    """`(args, the auth mode as a line to log)`; BadInput for a service anyone could use: no API key
    configured without allow_anonymous=true, or allow_anonymous on a host other machines reach (a key
    file emptied later would then open it). The keys are read as the ingress will read them."""
    from pathlib import Path

    from medisee.serving.auth import KeyRing, NoKeys

    if args.allow_anonymous and not is_loopback(host):
        raise BadInput(
            f"allow_anonymous=true is for a loopback host only, not --host {host}: "
            f"configure API keys (${args.api_keys_env} or api_keys_file=PATH) instead"
        )
    if args.api_keys_file:  # the replicas do not run in this directory
        args = args.model_copy(update={"api_keys_file": str(Path(args.api_keys_file).absolute())})
    try:
        ring = KeyRing(args.api_keys_env, args.api_keys_file, args.allow_anonymous)
    except NoKeys as exc:
        raise BadInput(f"{exc} (loopback hosts only)") from None
    if ring.anonymous():
        return args, f"auth: anonymous access on loopback {host} (allow_anonymous=true): no API key needed"
    return args, (
        f"auth: API keys required ({len(ring.env_keys)} from ${args.api_keys_env}, "
        f"{len(ring.file_keys)} from {args.api_keys_file or 'no api_keys_file'})"
    )


def _checked_versions(args):
    """Every version the app will load must be readable now (its manifest), not after the replicas
    have started and failed; a local tracking store is passed on to them as an absolute path."""
    from medisee import tracking
    from medisee.artifact.model_dir import describe_model
    from medisee.storage import StorageSettings

    refs = [args.model, *([args.served] if args.served else []), *args.extra_models]
    if any(ref.startswith(("models:/", "runs:/")) for ref in refs):
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.DEFAULT_TRACKING_URI
        args = args.model_copy(update={"tracking_uri": tracking.existing_store(uri, "tracking_uri")})
    settings = StorageSettings.resolve(args.storage_endpoint)
    for ref in refs:
        describe_model(ref, settings=settings, tracking_uri=args.tracking_uri)
    return args


@app.command("convert-checkpoint")
def convert_checkpoint(
    input_uri: str = typer.Option(
        ..., "--input", "-i", help="Official MediSee release (.pth / .bin), local or s3://."
    ),
    output_uri: str = typer.Option(..., "--output", "-o", help="Where to write the converted state dict."),
    rename: list[str] | None = typer.Option(None, help="Extra rename rule REGEX=REPLACEMENT (repeatable)."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """Convert an official MediSee release (original LLaVA key names, LoRA merged) to this platform's names."""
    from medisee.model.checkpoint import convert_official_file
    from medisee.storage import StorageSettings

    cfg = _config(config, [])
    rules = [tuple(r.split("=", 1)) for r in rename or []]
    count = convert_official_file(input_uri, output_uri, StorageSettings.from_config(cfg.storage), rules)
    typer.echo(json.dumps({"tensors": count, "output": output_uri}))


@app.command("config")
def show_config(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
) -> None:
    """Print the resolved configuration as YAML."""
    from medisee.config import config_to_yaml

    typer.echo(config_to_yaml(_config(config, overrides)))


@app.command("plan")
def plan_cmd(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP),
    inference: bool = typer.Option(False, help="Plan serving / batch scoring instead of training."),
) -> None:
    """Estimate GPU memory per worker for a preset: parameters, optimiser state, activations, and
    whether it fits 24 / 40 / 48 / 80 / 141 GB GPUs (JSON)."""
    from medisee.model.plan import plan, setup_from_config

    cfg = _config(config, overrides)
    typer.echo(json.dumps(plan(setup_from_config(cfg, inference)).as_dict(), indent=2))


if __name__ == "__main__":
    app()

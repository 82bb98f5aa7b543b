"""`build_app(AppArgs(...))`: the Serve application (ingress + MLLM + verifier + decoder deployments)."""

from __future__ import annotations

from ray.serve import Application

from medisee.serving.args import AppArgs, StageOptions
from medisee.serving.deployments import DecoderDeployment, MLLMDeployment, VerifierDeployment
from medisee.serving.ingress import Ingress


def stage_options(options: StageOptions) -> dict:
    out = {
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        "max_ongoing_requests": options.ongoing(),
        "max_queued_requests": options.max_queued_requests,
    }
    if options.autoscaling:
        out["autoscaling_config"] = options.autoscaling
    else:
        out["num_replicas"] = options.num_replicas
    return out


def build_app(args: AppArgs | dict) -> Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    served = args.served or args.model
    args = args.model_copy(update={"served": None})  # only the ingress's user_config names it: no restarts
    mllm = MLLMDeployment.options(**stage_options(args.mllm)).bind(args)
    decoder = DecoderDeployment.options(**stage_options(args.decoder)).bind(args)
    verifier = VerifierDeployment.options(**stage_options(args.verifier)).bind(args)
    i = args.ingress
    ingress = Ingress.options(
        user_config={"model": served, "extra_models": list(args.extra_models)},
        num_replicas=i.num_replicas,
        ray_actor_options={"num_cpus": i.num_cpus},
        max_ongoing_requests=i.max_ongoing_requests,
        max_queued_requests=i.max_queued_requests,
    )
    return ingress.bind(args, mllm, verifier, decoder)

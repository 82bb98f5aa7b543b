"""The Serve application for `serve run` / `serve deploy` / KubeRay's RayService.

    serve run serve/config.yaml                         (the config `serve build serve.app:app` writes)
    serve run serve.app:build_app model=models:/medisee@production    (typed args, see AppArgs)

`app` is bound from the environment (MEDISEE_SERVE_MODEL, MLFLOW_TRACKING_URI) because
`serve build` needs an Application, not a builder. The served version is the ingress's
`user_config.model`: change it in the config and `serve deploy` to switch versions in place.
"""

from medisee.serving.app import build_app
from medisee.serving.args import AppArgs

app = build_app(AppArgs.from_env())

__all__ = ["app", "build_app"]

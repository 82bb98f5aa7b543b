"""Model versions on one replica: the base part is loaded once; each version's trained weights are
swapped in when a request (or a batch, which Serve splits by model id) asks for that version."""

from __future__ import annotations

import threading

import torch
import yaml

from medisee.storage import StorageSettings


class IncompatibleVersion(ValueError):
    """A version whose weights do not fit the replica's base model (another preset or vocabulary)."""


class VersionedPart:
    def __init__(self, ref: str, part: str, settings: StorageSettings | None, tracking_uri: str | None):
        from medisee.artifact.model_dir import load_model_dir

        self.part, self.settings, self.tracking_uri = part, settings, tracking_uri
        self.loaded = load_model_dir(ref, settings=settings, tracking_uri=tracking_uri, parts=(part,))
        self.model = self.loaded.model
        self.default_ref = self.current = ref
        self.lock = threading.Lock()  # one version at a time on the resident model

    def weights_of(self, ref: str) -> dict[str, torch.Tensor]:
        """The trained weights of `ref` for this part (checked against the resident model)."""
        from medisee.artifact.fetch import fetched
        from medisee.artifact.model_dir import WEIGHTS, read_manifest, weights_for

        with fetched(ref, self.settings, self.tracking_uri) as (local, _):  # a download is removed after
            manifest = read_manifest(local, ref)
            mine = self.loaded.manifest
            for key in ("preset", "vocab_size", "candidate_ids", "image_token_id", "base"):
                if manifest.get(key) != mine.get(key):
                    raise IncompatibleVersion(
                        f"{ref}: {key} {manifest.get(key)!r} differs from the served base's {mine.get(key)!r}"
                    )
            if not any(manifest["base"].values()):  # randomly initialised base models: the seed is the base
                seed = yaml.safe_load((local / "config.yaml").read_text())["run"]["seed"]
                if seed != self.loaded.config.run.seed:
                    raise IncompatibleVersion(
                        f"{ref}: built on random base models of seed {seed}, the served base on {self.loaded.config.run.seed}"
                    )
            weights = weights_for(self.model, local / WEIGHTS)
        own = self.model.state_dict()
        unknown = [k for k in weights if k not in own]
        mismatched = [k for k in weights if k in own and own[k].shape != weights[k].shape]
        if unknown or mismatched:
            example = (unknown or mismatched)[0]
            raise IncompatibleVersion(
                f"{ref}: {len(unknown) + len(mismatched)} weights do not fit the served model, e.g. {example}"
            )
        return weights

    def use(self, ref: str, weights: dict[str, torch.Tensor] | None) -> None:
        """Make `ref` the resident version (call with `lock` held)."""
        if ref != self.current:
            self.model.load_state_dict(weights if weights is not None else self.weights_of(ref), strict=False)
            self.current = ref

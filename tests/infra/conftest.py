"""Fixtures for the infra/ checks: the KubeRay CRD schemas and kustomize renders."""

from __future__ import annotations

import pytest
import yaml

from tests.infra.helpers import CRD_DIR, KUSTOMIZATIONS, base_documents, kubectl, kustomize


def strict(schema):
    """A CRD schema that rejects unknown fields, as `kubectl apply --validate=strict` does (the API
    server would otherwise drop a misspelt field without a word)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def read_crd_schemas() -> dict[str, dict]:
    """{"ray.io/v1 RayJob": openAPIV3Schema, ...} for every kind and version in the CRD folder."""
    schemas = {}
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[f"{group}/{version['name']} {kind}"] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.fixture(scope="session")
def crd_schemas() -> dict[str, dict]:
    """Strict schemas by "apiVersion kind" (libyaml reads the 3 MB of CRDs in a second or two)."""
    if not list(CRD_DIR.glob("ray.io_*.yaml")):
        pytest.skip(f"KubeRay CRDs not found in {CRD_DIR} (copy ray-operator/config/crd/bases there)")
    return {name: strict(schema) for name, schema in read_crd_schemas().items()}


@pytest.fixture(scope="session")
def renders() -> dict[str, tuple[dict, ...]]:
    """`kubectl kustomize` of the base and each overlay."""
    if kubectl() is None:
        pytest.skip("kubectl not found: the kustomize renders are not checked (base files still are)")
    return {name: kustomize(name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def manifests() -> dict[str, tuple[dict, ...]]:
    """The renders when kubectl is here; else the base as read from its files (overlays unchecked)."""
    if kubectl() is None:
        return {"base (files; no kubectl, overlays not checked)": tuple(base_documents())}
    return {name: kustomize(name) for name in KUSTOMIZATIONS}

"""Which queries each image gets: `scoring.queries` is one of

records                                   the query of each shard row (parquet shards only)
<uri>.jsonl                               a manifest: {"image": KEY, "queries": [...]} per line, KEY
                                          being a path (relative to the input or absolute), a DICOM
                                          SeriesInstanceUID, a volume path, or `volume#z` (one slice)
template=<text with {class}>;classes=a,b  the template for every class, applied to every image
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from medisee import storage
from medisee.data.prompts import reserved_tokens
from medisee.storage import StorageSettings


class QuerySpecError(ValueError):
    """An unusable `scoring.queries` value or manifest; the message says what to fix."""


@dataclass
class QueryPlan:
    kind: str  # records | manifest | template
    template_queries: list[str] = field(default_factory=list)
    manifest: dict[str, list[str]] = field(default_factory=dict)

    def for_image(self, keys: list[str]) -> list[str]:
        """The queries of an image known by any of `keys` (most specific first), in order, deduplicated."""
        if self.kind == "template":
            return list(self.template_queries)
        out: list[str] = []
        for key in keys:
            for query in self.manifest.get(key, []):
                if query not in out:
                    out.append(query)
        return out


def parse_query_spec(spec: str, input_uri: str, settings: StorageSettings | None = None) -> QueryPlan:
    spec = spec.strip()
    if spec == "records":
        return QueryPlan("records")
    if spec.startswith("template="):
        return QueryPlan("template", template_queries=_template_queries(spec))
    if spec.endswith(".jsonl"):
        return QueryPlan("manifest", manifest=_read_manifest(spec, input_uri, settings))
    raise QuerySpecError(
        f"scoring.queries={spec!r}: expected 'records', a .jsonl manifest, "
        "or 'template=<text with {class}>;classes=a,b'"
    )


def _template_queries(spec: str) -> list[str]:
    body, _, classes = spec[len("template=") :].partition(";classes=")
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if "{class}" not in body or not names:
        raise QuerySpecError(
            f"scoring.queries={spec!r}: a template needs '{{class}}' in its text and ';classes=a,b'"
        )
    queries = [body.replace("{class}", name.replace("_", " ")) for name in names]
    if reserved := [t for q in queries for t in reserved_tokens(q)]:
        raise QuerySpecError(f"scoring.queries={spec!r}: {reserved[0]!r} is reserved by the model's template")
    return queries


def _read_manifest(uri: str, input_uri: str, settings: StorageSettings | None) -> dict[str, list[str]]:
    try:
        text = storage.read_text(uri, settings)
    except OSError as exc:
        raise QuerySpecError(f"query manifest {uri}: cannot read it ({exc})") from None
    manifest: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key, queries = entry["image"], entry["queries"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise QuerySpecError(
                f'query manifest {uri} line {number}: expected {{"image": ..., "queries": [...]}}'
            ) from None
        if isinstance(queries, str):
            queries = [queries]
        if not isinstance(queries, list) or not all(isinstance(q, str) and q.strip() for q in queries):
            raise QuerySpecError(f"query manifest {uri} line {number}: queries must be non-empty strings")
        if reserved := [t for q in queries for t in reserved_tokens(q)]:
            raise QuerySpecError(
                f"query manifest {uri} line {number}: {reserved[0]!r} is reserved by the template"
            )
        manifest.setdefault(_normalise_key(str(key), input_uri), []).extend(q.strip() for q in queries)
    if not manifest:
        raise QuerySpecError(f"query manifest {uri} lists no image")
    return manifest


def _normalise_key(key: str, input_uri: str) -> str:
    """Absolute paths under the input become relative, so that keys match the planner's."""
    root = input_uri.rstrip("/") + "/"
    if key.startswith(root):
        return key[len(root) :]
    return key[2:] if key.startswith("./") else key

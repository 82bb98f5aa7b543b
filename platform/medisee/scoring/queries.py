"""Which queries each image gets: `scoring.queries` is one of

records                                   the query of each shard row (parquet shards only)
<uri>.jsonl                               a manifest: {"image": KEY, "queries": [...]} or
                                          {"image": KEY, "box": [x0, y0, x1, y1]} per line, KEY
                                          being a path (relative to the input or absolute), a DICOM
                                          SeriesInstanceUID, a volume path, or `volume#z` (one slice)
template=<text with {class}>;classes=a,b  the template for every class, applied to every image

A `box` line is a box prompt (MedSAM's interactive mode): pixel xyxy of the image as scored, last
pixel inclusive, decoded by `DecoderStage.segment_boxes` without the MLLM or the verifier. What only
the image can tell (a box that `check_box` refuses for its size) and a line giving both a query text
and a box become error rows of that image (`bad_box`, `query_and_box`), not a refused manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from medisee import storage
from medisee.data.prompts import reserved_tokens
from medisee.storage import StorageSettings


class QuerySpecError(ValueError):
    """An unusable `scoring.queries` value or manifest; the message says what to fix."""


@dataclass(frozen=True)
class BoxPrompt:
    """A manifest line with a box: checked against its image (`check_box`) when the image is decoded."""

    box: object  # as the line gives it
    line: int
    query: str | None = None  # the line also gave a query text: it becomes a `query_and_box` error row


@dataclass
class QueryPlan:
    kind: str  # records | manifest | template
    template_queries: list[str] = field(default_factory=list)
    manifest: dict[str, list[str]] = field(default_factory=dict)
    boxes: dict[str, list[BoxPrompt]] = field(default_factory=dict)  # manifest lines with a box

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

    def boxes_for_image(self, keys: list[str]) -> list[BoxPrompt]:
        """The box prompts of an image known by any of `keys`, in manifest order, deduplicated by box."""
        out: list[BoxPrompt] = []
        for key in keys:
            for prompt in self.boxes.get(key, []):
                if all((p.box, p.query) != (prompt.box, prompt.query) for p in out):
                    out.append(prompt)
        return out

    def has_boxes(self) -> bool:
        return any(self.boxes.values())


def parse_query_spec(spec: str, input_uri: str, settings: StorageSettings | None = None) -> QueryPlan:
    spec = spec.strip()
    if spec == "records":
        return QueryPlan("records")
    if spec.startswith("template="):
        return QueryPlan("template", template_queries=_template_queries(spec))
    if spec.endswith(".jsonl"):
        manifest, boxes = _read_manifest(spec, input_uri, settings)
        return QueryPlan("manifest", manifest=manifest, boxes=boxes)
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


def _read_manifest(
    uri: str, input_uri: str, settings: StorageSettings | None
) -> tuple[dict[str, list[str]], dict[str, list[BoxPrompt]]]:
    try:
        text = storage.read_text(uri, settings)
    except OSError as exc:
        raise QuerySpecError(f"query manifest {uri}: cannot read it ({exc})") from None
    manifest: dict[str, list[str]] = {}
    boxes: dict[str, list[BoxPrompt]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            key = entry["image"]
            box = entry.get("box")
            queries = entry["queries"] if box is None else entry.get("queries")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise QuerySpecError(
                f'query manifest {uri} line {number}: expected {{"image": ..., "queries": [...]}} '
                'or {"image": ..., "box": [x0, y0, x1, y1]}'
            ) from None
        key = _normalise_key(str(key), input_uri)
        if box is not None:
            boxes.setdefault(key, []).append(BoxPrompt(box, number, _query_text(queries)))
            continue
        if isinstance(queries, str):
            queries = [queries]
        if not isinstance(queries, list) or not all(isinstance(q, str) and q.strip() for q in queries):
            raise QuerySpecError(f"query manifest {uri} line {number}: queries must be non-empty strings")
        if reserved := [t for q in queries for t in reserved_tokens(q)]:
            raise QuerySpecError(
                f"query manifest {uri} line {number}: {reserved[0]!r} is reserved by the template"
            )
        manifest.setdefault(key, []).extend(q.strip() for q in queries)
    if not manifest and not boxes:
        raise QuerySpecError(f"query manifest {uri} lists no image")
    return manifest, boxes


def _query_text(queries) -> str | None:
    """The query text a box line also gives (None, "" and [] give none), as one string."""
    if queries is None or queries == [] or (isinstance(queries, str) and not queries.strip()):
        return None
    if isinstance(queries, list):
        return " | ".join(str(q) for q in queries)[:300]
    return str(queries)[:300]


def _normalise_key(key: str, input_uri: str) -> str:
    """Absolute paths under the input become relative, so that keys match the planner's."""
    root = input_uri.rstrip("/") + "/"
    if key.startswith(root):
        return key[len(root) :]
    return key[2:] if key.startswith("./") else key

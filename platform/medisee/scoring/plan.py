"""The job's plan: every input file sorted into partitions, the unit of output and of resumption.

    folder of shards   one partition per shard file
    image files        one partition per `images_per_partition` files (sorted by path)
    DICOM files        one partition per series (SeriesInstanceUID), files ordered by position
    NIfTI volumes      one partition per volume
    anything else      one partition per file, which becomes an error row (unsupported / unreadable)

An archive may mix them. The plan is deterministic for a given listing, so a rerun finds the same
partitions and skips the finished ones.

A partition's key names its output files, so keys are unique by construction: a prefix for the kind,
then `unique_name` of the input's path or series UID (a lower-case slug for reading, and a hash of
the original text, so `a b.nii.gz` and `a_b.nii.gz`, or `A.png` and `a.png`, stay apart even on a
case-insensitive store). A plan with a key twice is refused all the same.

A file of a local input folder that resolves outside it (a symbolic link leaving the folder, a
manifest path climbing out) is not read: it becomes an error row.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re

import numpy as np

from medisee import storage
from medisee.storage import StorageSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SHARD_SUFFIXES = (".parquet",)
IGNORED_SUFFIXES = (".json", ".jsonl", ".txt", ".md", ".csv", ".yaml", ".yml")


class PlanError(ValueError):
    """The input cannot be planned (missing, empty); the message says what was looked for."""


def slug(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    if len(text) > 120:
        text = f"{text[:100]}_{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    return text or "root"


def unique_name(identity: str, label: str | None = None) -> str:
    """A file name for `identity` that no other identity gets: the lower-case slug of `label`
    (default: the identity) for reading, then a short hash of the identity itself."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{slug(identity if label is None else label).lower()[:100]}-{digest}"


def relative(uri: str, root: str) -> str:
    root = root.rstrip("/")
    if uri == root:
        return posixpath.basename(uri)
    return uri[len(root) + 1 :] if uri.startswith(root + "/") else posixpath.basename(uri)


def classify(rel: str) -> str | None:
    name = posixpath.basename(rel).lower()
    if name.startswith((".", "_")) or name.endswith(IGNORED_SUFFIXES):
        return None
    for kind, suffixes in (("shard", SHARD_SUFFIXES), ("image", IMAGE_SUFFIXES), ("nifti", NIFTI_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return "dicom"


def list_inputs(input_uri: str, settings: StorageSettings | None) -> list[str]:
    if not storage.exists(input_uri, settings):
        raise PlanError(f"input {input_uri} does not exist")
    fs, path = storage.filesystem(input_uri, settings)
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.File:
        return [input_uri]
    return storage.list_files(input_uri, (), settings)


def plan_partitions(
    input_uri: str,
    settings: StorageSettings | None = None,
    images_per_partition: int = 64,
    split: str | None = None,
) -> list[dict]:
    if storage.exists(storage.join(input_uri, "manifest.json"), settings):
        return prepared_shards(input_uri, settings, split)
    files = list_inputs(input_uri, settings)
    single_file = len(files) == 1 and files[0] == input_uri
    root = posixpath.dirname(input_uri) if single_file else input_uri
    by_kind: dict[str, list[tuple[str, str]]] = {}
    refused = []
    for uri in files:
        rel = relative(uri, root)
        kind = classify(rel)
        if kind is None:
            continue
        problem = None if single_file else outside_input(root, uri)
        if problem is not None:
            refused.append(unreadable(uri, rel, problem.reason, problem.detail))
        else:
            by_kind.setdefault(kind, []).append((uri, rel))
    shards = [(u, r) for u, r in by_kind.get("shard", []) if split is None or f"/{split}/" in f"/{r}"]
    partitions = [shard_partition(u, r) for u, r in shards]
    partitions += image_partitions(by_kind.get("image", []), images_per_partition)
    partitions += [
        {"key": "nifti-" + unique_name(r, nifti_stem(r)), "kind": "nifti", "uri": u, "rel": r}
        for u, r in by_kind.get("nifti", [])
    ]
    partitions += dicom_partitions(by_kind.get("dicom", []), settings) + refused
    if not partitions:
        raise PlanError(
            f"input {input_uri}: nothing to score (looked for *.parquet shards, images "
            f"{'/'.join(IMAGE_SUFFIXES)}, NIfTI *.nii(.gz) and DICOM files)"
        )
    return check_unique_keys(partitions)


def shard_partition(uri: str, rel: str) -> dict:
    return {"key": "shard-" + unique_name(rel, rel.removesuffix(".parquet")), "kind": "shard", "uri": uri,
            "rel": rel}  # fmt: skip


def image_partitions(images: list[tuple[str, str]], images_per_partition: int) -> list[dict]:
    """Images in groups by listing order: keys by group number, unique whatever the names."""
    partitions = []
    for start in range(0, len(images), images_per_partition):
        items = [{"uri": u, "rel": r} for u, r in images[start : start + images_per_partition]]
        partitions.append(
            {"key": f"images-{start // images_per_partition:05d}", "kind": "image", "items": items}
        )
    return partitions


def nifti_stem(rel: str) -> str:
    for suffix in NIFTI_SUFFIXES[::-1]:
        if rel.lower().endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def unreadable(uri: str, rel: str, reason: str, detail: str) -> dict:
    """A partition of one file that is not read: it becomes one error row."""
    return {"key": "file-" + unique_name(rel), "kind": "unreadable", "uri": uri, "rel": rel,
            "error": reason, "detail": detail}  # fmt: skip


def outside_input(root: str, uri: str):
    """Why `uri` must not be read as part of the input `root` (a BadRecord), or None."""
    from medisee.data.sources.files import outside_input as check

    prefix = root.rstrip("/") + "/"
    return check(root, uri[len(prefix) :] if uri.startswith(prefix) else uri)


def inputs_of(partition: dict) -> list[dict]:
    """The input files a partition was planned with: {"uri", "rel"} each."""
    if "items" in partition:
        return [{"uri": i["uri"], "rel": i["rel"]} for i in partition["items"]]
    return [{"uri": partition["uri"], "rel": partition["rel"]}]


def check_unique_keys(partitions: list[dict]) -> list[dict]:
    """PlanError naming both inputs when two partitions would write the same files (keys compared
    case-insensitively, as a case-insensitive store would)."""
    seen: dict[str, dict] = {}
    for p in partitions:
        other = seen.setdefault(p["key"].casefold(), p)
        if other is not p:
            raise PlanError(
                f"partitions {other['key']!r} and {p['key']!r} would write the same output files: "
                f"{_described(other)} and {_described(p)}; rename one of them"
            )
    return partitions


def _described(partition: dict) -> str:
    if partition.get("series_uid"):
        return f"DICOM series {partition['series_uid']}"
    rels = [i["rel"] for i in inputs_of(partition)]
    return rels[0] + (f" (+{len(rels) - 1} more)" if len(rels) > 1 else "")


def prepared_shards(input_uri: str, settings: StorageSettings | None, split: str | None) -> list[dict]:
    """The output of `medisee prepare`: its manifest lists the shards (the quarantine is not input)."""
    from medisee.data.reader import shard_files

    partitions = []
    for uri in shard_files(input_uri, split, settings):
        rel = relative(uri, input_uri)
        problem = outside_input(input_uri, uri)
        partitions.append(
            shard_partition(uri, rel)
            if problem is None
            else unreadable(uri, uri, problem.reason, problem.detail)
        )
    if not partitions:
        raise PlanError(
            f"input {input_uri}: its manifest.json lists no shard" + (f" of split {split!r}" if split else "")
        )
    return check_unique_keys(partitions)


def plan_digest(partitions: list[dict]) -> str:
    return hashlib.sha256(json.dumps(partitions, sort_keys=True).encode()).hexdigest()


# ----- DICOM -------------------------------------------------------------------------------------
def dicom_header(uri: str, rel: str, settings: StorageSettings | None) -> dict:
    """What planning needs from one file; `error` set when it is not readable DICOM."""
    from medisee.data.bounded import read_dicom_header

    try:
        fs, path = storage.filesystem(uri, settings)
        with fs.open_input_file(path) as f:
            ds = read_dicom_header(f.read(min(f.size(), 1 << 20)))  # a deflated file: bounded inflation
    except Exception as exc:  # pydicom raises many types for damaged files
        return {
            "uri": uri,
            "rel": rel,
            "error": "unreadable_dicom",
            "detail": f"{type(exc).__name__}: {exc}"[:200],
        }
    if "SOPInstanceUID" not in ds or "Rows" not in ds:
        return {
            "uri": uri,
            "rel": rel,
            "error": "unsupported_format",
            "detail": "not an image, DICOM, NIfTI or shard",
        }
    return {
        "uri": uri,
        "rel": rel,
        "series_uid": str(ds.get("SeriesInstanceUID", "") or f"no-series-{ds.SOPInstanceUID}"),
        "sop_uid": str(ds.SOPInstanceUID),
        "position": _position(ds),
        "instance": int(ds.get("InstanceNumber", 0) or 0),
    }


def _position(ds) -> float | None:
    """Distance along the slice normal (ImagePositionPatient · row × column direction)."""
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    return float(np.dot(position, np.cross(orientation[:3], orientation[3:])))


def dicom_partitions(files: list[tuple[str, str]], settings: StorageSettings | None) -> list[dict]:
    if not files:
        return []
    headers = read_headers(files, settings)
    partitions, series = [], {}
    for h in headers:
        if h.get("error"):
            partitions.append(unreadable(h["uri"], h["rel"], h["error"], h["detail"]))
        else:
            series.setdefault(h["series_uid"], []).append(h)
    for uid, members in sorted(series.items()):
        members.sort(key=lambda h: (h["position"] is None, h["position"] or 0.0, h["instance"], h["rel"]))
        members, copies = distinct_instances(members)
        partitions += copies
        items = [{k: h[k] for k in ("uri", "rel", "sop_uid")} for h in members]
        partitions.append(
            {"key": "dicom-" + unique_name(uid), "kind": "dicom", "series_uid": uid, "items": items}
        )
    return partitions


def distinct_instances(members: list[dict]) -> tuple[list[dict], list[dict]]:
    """A series' files with one file per SOPInstanceUID (the first by path), and an error partition
    for each further copy: two copies would give two rows the same id."""
    first: dict[str, dict] = {}
    for h in sorted(members, key=lambda h: h["rel"]):
        first.setdefault(h["sop_uid"], h)
    kept = [h for h in members if first[h["sop_uid"]] is h]
    copies = [
        unreadable(h["uri"], h["rel"], "duplicate_instance",
                   f"SOPInstanceUID {h['sop_uid']} is also {first[h['sop_uid']]['rel']}, which was scored")
        for h in members if first[h["sop_uid"]] is not h
    ]  # fmt: skip
    return kept, copies


def read_headers(files: list[tuple[str, str]], settings: StorageSettings | None) -> list[dict]:
    """Headers of many files: Ray tasks when Ray is up and there are many, else in this process."""
    import ray

    if len(files) < 64 or not ray.is_initialized():
        return [dicom_header(u, r, settings) for u, r in files]
    import ray.data

    def headers(batch: dict) -> dict:
        rows = [dicom_header(u, r, settings) for u, r in zip(batch["uri"], batch["rel"], strict=True)]
        return {"header": np.asarray([json.dumps(r) for r in rows], dtype=object)}

    ds = ray.data.from_items([{"uri": u, "rel": r} for u, r in files]).map_batches(headers, num_cpus=0.25)
    return [json.loads(row["header"]) for row in ds.iter_rows()]

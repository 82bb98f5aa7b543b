"""Does the output account for every planned input? Counted from the committed files, per partition.

For each planned partition with a `_done` marker:
    - its result and error files hold as many rows as the marker says (Parquet footers), and the
      marker's own inputs (rows the decode step announced) equal its results + errors;
    - every input file the plan put in it is the `source` of at least one row, or was skipped
      (no query for it, only empty slices): the marker's skip counts must cover the inputs without
      a row. A shard's rows name the images inside it, not the shard, so shards are checked by
      their counts alone.
Files in `results/` or `errors/` that no planned partition names are reported too.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from medisee import storage
from medisee.scoring.plan import inputs_of

TABLES = ("results", "errors")
EXAMPLES = 20  # inputs without a row named in the summary (all are counted)
READERS = 16  # partitions checked at once: on S3 each check is a few small requests


def reconcile(output: str, partitions: list[dict], markers: dict[str, dict], settings) -> dict:
    files = {t: committed_files(output, t, settings) for t in TABLES}
    done = [p for p in partitions if p["key"] in markers]
    with ThreadPoolExecutor(READERS) as pool:
        checks = list(
            pool.map(lambda p: check_partition(output, p, markers[p["key"]], files, settings), done)
        )
    planned = {p["key"] for p in partitions}
    unaccounted = sorted(rel for c in checks for rel in c["unaccounted"])
    return {
        "planned_inputs": sum(len(inputs_of(p)) for p in partitions),
        "results": sum(c["results"] for c in checks),
        "errors": sum(c["errors"] for c in checks),
        "unaccounted_inputs": len(unaccounted),
        "unaccounted_examples": unaccounted[:EXAMPLES],
        "partitions_inconsistent": {c["key"]: c["problem"] for c in checks if c["problem"]},
        "files_not_in_plan": sorted(
            f"{t}/{name}.parquet" for t in TABLES for name in files[t] if name not in planned
        ),
    }


def committed_files(output: str, table: str, settings) -> set[str]:
    """Partition keys that have a file in one output table."""
    uris = storage.list_files(storage.join(output, table), (".parquet",), settings)
    return {u.rsplit("/", 1)[-1].removesuffix(".parquet") for u in uris}


def check_partition(output: str, partition: dict, marker: dict, files: dict, settings) -> dict:
    key = partition["key"]
    counts, sources = {}, set()
    for table in TABLES:
        rows, table_sources = (
            read_sources(output, table, key, settings) if key in files[table] else (0, set())
        )
        counts[table] = rows
        sources |= table_sources
    return {
        "key": key,
        **counts,
        "problem": count_problem(marker, counts),
        "unaccounted": unaccounted_inputs(partition, marker, sources),
    }


def read_sources(output: str, table: str, key: str, settings) -> tuple[int, set[str]]:
    """Rows of one committed file (its footer) and the input files they name."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(storage.join(output, table, f"{key}.parquet"), settings)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        sources = parquet.read(columns=["source"]).column("source").unique().to_pylist()
        return parquet.metadata.num_rows, set(sources)


def count_problem(marker: dict, counts: dict) -> str | None:
    claimed = (marker["results"], marker["errors"])
    if claimed != (counts["results"], counts["errors"]):
        return (
            f"its marker counts {claimed[0]} results + {claimed[1]} errors, its files hold "
            f"{counts['results']} + {counts['errors']}"
        )
    if marker["inputs"] != sum(claimed):
        return f"its marker counts {marker['inputs']} inputs but {sum(claimed)} results + errors"
    return None


def unaccounted_inputs(partition: dict, marker: dict, sources: set[str]) -> list[str]:
    if partition["kind"] == "shard":
        return []
    without_rows = [i["rel"] for i in inputs_of(partition) if i["uri"] not in sources]
    return without_rows if len(without_rows) > sum(marker.get("skipped", {}).values()) else []

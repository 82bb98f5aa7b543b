"""Getting an artifact's files: a local folder, an s3:// prefix, `runs:/<id>/model` or a registered
`models:/<name>@<alias>` / `models:/<name>/<version>`.

Downloads go to a new temp folder; every file stays inside it (a key or listing that would leave it
is refused) and the folder is removed again afterwards.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from pathlib import Path

from medisee import storage, tracking
from medisee.model.checkpoint import CheckpointError
from medisee.storage import StorageSettings


def download(
    ref: str, settings: StorageSettings | None, tracking_uri: str | None
) -> tuple[Path, str | None, Path | None]:
    """(local folder of the artifact, MLflow run id when known, the temp folder to remove or None).

    Downloads go to a new temp folder; every file stays inside it (a key or listing that would leave
    it is refused) and the folder is removed again when the download fails.
    """
    if is_local(ref):
        return local_folder(ref), None, None
    temporary = Path(tempfile.mkdtemp(prefix="medisee-model-"))
    try:
        local, run_id = download_into(temporary, ref, settings, tracking_uri)
    except BaseException:
        remove_download(temporary)
        raise
    return local, run_id, temporary


def is_local(ref: str) -> bool:
    return not ref.startswith(("models:/", "runs:/")) and not storage.is_s3(ref)


def local_folder(ref: str) -> Path:
    path = Path(ref.removeprefix("file://"))
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise CheckpointError(ref, detail=f"{what}, and not an s3:// prefix, runs:/ or models:/ reference")
    return path


def download_into(folder: Path, ref: str, settings, tracking_uri) -> tuple[Path, str | None]:
    try:
        if storage.is_s3(ref):
            if not storage.download_dir(ref, folder, settings):
                raise CheckpointError(ref, detail="no files under this prefix")
            return folder, None
        client = tracking.reader_for(tracking_uri, settings)
        run_id = tracking.trained_run_id(client, ref)
        return tracking.download_model(client, ref, folder), run_id
    except storage.UnsafeKey as exc:
        raise CheckpointError(ref, detail=f"refused: {exc}") from None


def remove_download(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def fetched(ref: str, settings: StorageSettings | None, tracking_uri: str | None):
    """`(local folder, run id)` of an artifact for the block; a downloaded copy is removed after it."""
    local, run_id, temporary = download(str(ref), settings, tracking_uri)
    try:
        yield local, run_id
    finally:
        remove_download(temporary)


def fetch(ref: str, settings: StorageSettings | None, tracking_uri: str | None) -> tuple[Path, str | None]:
    """A local directory holding the artifact, and the MLflow run that produced it (when known).

    A downloaded copy is removed when this process exits; prefer `fetched`, which removes it sooner.
    """
    local, run_id, temporary = download(str(ref), settings, tracking_uri)
    if temporary is not None:
        atexit.register(remove_download, temporary)
    return local, run_id


def read_artifact_file(
    ref: str, name: str, *, settings: StorageSettings | None = None, tracking_uri: str | None = None
) -> bytes | None:
    """One file of an artifact without fetching the rest (None when it has no such file)."""
    ref = str(ref)
    if ref.startswith(("models:/", "runs:/")):
        client = tracking.reader_for(tracking_uri, settings)
        tracking.trained_run_id(client, ref)  # an unknown model or run is an error, not a missing file
        with tempfile.TemporaryDirectory(prefix="medisee-file-") as folder:
            try:
                return tracking.download_model(client, ref, folder, file=name).read_bytes()
            except Exception:  # mlflow raises different types for a missing artifact file
                return None
    uri = storage.join(ref.removeprefix("file://"), name)
    return storage.read_bytes(uri, settings) if storage.exists(uri, settings) else None

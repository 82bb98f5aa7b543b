"""API keys: from an environment variable and / or a file that is re-read when it changes, so a key
is rotated without restarting a replica (a mounted Kubernetes Secret updates the file in place)."""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger("medisee.serve")


class NoKeys(RuntimeError):
    """No API key is configured and anonymous access was not asked for."""


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant time in the key's content: every configured key is compared, no early exit."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched


def given_key(headers) -> str:
    """The key of a request: `X-API-Key`, or `Authorization: Bearer <key>` (scheme in any case)."""
    if headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


class KeyRing:
    def __init__(self, env_name: str, file: str | None, allow_anonymous: bool):
        self.env_keys = [k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip()]
        self.file, self.allow_anonymous = (Path(file) if file else None), allow_anonymous
        self.file_keys: list[str] = []
        self.stamp: tuple | None = None
        self.refresh()
        if not self.keys() and not allow_anonymous:
            raise NoKeys(
                f"no API key configured (${env_name} is empty"
                + (f" and {file} holds none" if file else ", no api_keys_file")
                + "): set one, or allow_anonymous=true to serve without keys"
            )
        log.warning("auth: anonymous access, no API key needed") if self.anonymous() else log.info(
            "auth: API keys required (%d from $%s, %d from %s)", len(self.env_keys), env_name,
            len(self.file_keys), file or "no file",
        )  # fmt: skip

    def keys(self) -> list[str]:
        return self.env_keys + self.file_keys

    def anonymous(self) -> bool:
        return self.allow_anonymous and not self.keys()

    def refresh(self) -> None:
        """Re-read the key file when its modification time, size or inode changed (one stat per call)."""
        if self.file is None:
            return
        try:
            info = self.file.stat()
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp != self.stamp:
                lines = self.file.read_text().splitlines()
                self.file_keys, self.stamp = [line.strip() for line in lines if line.strip()], stamp
                log.info("auth: %d API keys read from %s", len(self.file_keys), self.file)
        except OSError as exc:  # a vanished or unreadable file revokes its keys (fail closed)
            if self.stamp != "missing":
                log.error("auth: cannot read %s (%s); its keys no longer admit anyone", self.file, exc)
            self.file_keys, self.stamp = [], "missing"

    def admits(self, headers) -> bool:
        self.refresh()
        if self.anonymous():
            return True
        given = given_key(headers)
        return bool(given) and key_matches(given, self.keys())

"""What a converter needs besides its input: storage settings and prepare options."""

from __future__ import annotations

from dataclasses import dataclass

from medisee.config import PrepareConfig
from medisee.storage import StorageSettings


@dataclass(frozen=True)
class ConvertContext:
    settings: StorageSettings
    prepare: PrepareConfig
    source: str
    modality: str = "unknown"

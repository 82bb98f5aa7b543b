"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/train.py --config tiny [overrides]` (a preset name or a YAML file)."""

import sys

from medisee.cli import app
from medisee.raylib import apply_env_defaults


def main() -> None:
    apply_env_defaults()
    app(["train", *sys.argv[1:]])


if __name__ == "__main__":
    main()

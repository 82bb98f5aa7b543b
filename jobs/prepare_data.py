"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/prepare_data.py FORMAT --input ... --output ...`"""

import sys

from medisee.cli import app
from medisee.raylib import apply_env_defaults


def main() -> None:
    apply_env_defaults()
    app(["prepare", *sys.argv[1:]])


if __name__ == "__main__":
    main()

"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/batch_score.py --input s3://... \
--queries 'template=Segment the {class}.;classes=liver,spleen' --model models:/medisee@candidate --output s3://...`"""

import sys

from medisee.cli import app
from medisee.raylib import apply_env_defaults


def main() -> None:
    apply_env_defaults()
    app(["score", *sys.argv[1:]])


if __name__ == "__main__":
    main()

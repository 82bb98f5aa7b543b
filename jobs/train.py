"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/tiny.yaml [overrides]`"""

import sys

from medisee.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])

"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/prepare_data.py FORMAT --input ... --output ...`"""

from medisee.cli import app

if __name__ == "__main__":
    app(["prepare", *__import__("sys").argv[1:]])

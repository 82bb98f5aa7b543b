import numpy as np
import pytest

from medisee.model import build_model


@pytest.fixture(scope="session")
def tiny():
    model = build_model("tiny", seed=0)
    model.eval()
    return model


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 255, (100, 140, 3), dtype=np.uint8),
        rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
        rng.integers(0, 255, (90, 50, 3), dtype=np.uint8),
    ]


QUERIES = [
    "Can you segment the liver in this image?",
    "Where is the spleen in this image?",
    "Which organ produces bile?",
]

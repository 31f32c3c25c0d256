import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("BIMACOSR_REFERENCE", REPO.parent / "shared" / "reference"))
FIXTURES = REFERENCE / "fixtures"


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference folder not found at {REFERENCE}; set BIMACOSR_REFERENCE")
    return REFERENCE


def load_fixture(relpath: str) -> dict:
    return torch.load(FIXTURES / relpath, map_location="cpu", weights_only=True)

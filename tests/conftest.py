from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "s1s2_calif"
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared s1s2_calif dataset; tests that need it skip when it is absent."""
    if not (SHARED / "pairs.csv").is_file():
        pytest.skip("shared data not available")
    return SHARED

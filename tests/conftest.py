import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DRIVE = ROOT.parent / "shared" / "data" / "DRIVE"


@pytest.fixture
def drive_root():
    if not (DRIVE / "training" / "images").is_dir():
        pytest.skip(f"DRIVE is not at {DRIVE} (CI has it; locally put the official layout there)")
    return DRIVE

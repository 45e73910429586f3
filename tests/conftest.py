import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DRIVE = ROOT.parent / "shared" / "data" / "DRIVE"
JSRT = ROOT.parent / "shared" / "data" / "JSRT_SCR"


@pytest.fixture
def drive_root():
    if not (DRIVE / "training" / "images").is_dir():
        pytest.skip(f"DRIVE is not at {DRIVE} (CI has it; locally put the official layout there)")
    return DRIVE


@pytest.fixture
def jsrt_root():
    if not (JSRT / "images").is_dir():
        pytest.skip(f"JSRT is not at {JSRT} (CI has it; locally put images/, masks/ and test.txt there)")
    return JSRT


@pytest.fixture
def one_thread():
    """Small tensors run faster on one thread, and two OpenMP threads on two busy cores stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Bad input ends in one sentence on stderr and exit status 2, never a traceback."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_lora(*argv, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "lora.py"), "--device", "cpu", *argv], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for n in needles:
        assert n in message


def test_missing_dataset(tmp_path):
    assert_clean_failure(run_lora("--model", "tiny", "--data", "drive", "--data-root", str(tmp_path / "nope")),
                         "does not exist", "--data-root")


def test_data_arguments_are_checked_before_the_model_is_built(tmp_path):
    # no checkpoint in tmp_path: had the model been built first, the error would name sam_vit_b_01ec64.pth
    proc = run_lora("--model", "vit_b", "--data", "drive", cwd=tmp_path)
    assert_clean_failure(proc, "DRIVE is not in data/DRIVE/", "--data-root PATH")
    proc = run_lora("--model", "vit_b", "--data", "drive", "--data-root", str(tmp_path), "--num-classes", "2",
                    cwd=tmp_path)
    assert_clean_failure(proc, "one foreground class")


def test_wrong_drive_layout(tmp_path):
    (tmp_path / "training" / "images").mkdir(parents=True)
    assert_clean_failure(run_lora("--model", "tiny", "--data", "drive", "--data-root", str(tmp_path)),
                         "1st_manual")


def test_missing_sam_checkpoint(tmp_path):
    proc = run_lora("--model", "vit_b", "--data", "synthetic", cwd=tmp_path)
    assert_clean_failure(proc, "sam_vit_b_01ec64.pth", "checkpoints/")


def test_checkpoint_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "sam.pth"
    bogus.write_text("not a checkpoint")
    assert_clean_failure(run_lora("--model", "vit_b", "--checkpoint", str(bogus)), "not a readable")


def test_image_size_the_model_cannot_take():
    assert_clean_failure(run_lora("--model", "tiny", "--img-size", "100"), "multiple of 16")
    assert_clean_failure(run_lora("--model", "mobile_sam", "--img-size", "480"), "multiples of 64")


def test_folder_with_a_mask_of_another_size(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "images" / f"a{i}.png")
        Image.fromarray(np.zeros((40, 40 if i else 30), np.uint8)).save(tmp_path / "masks" / f"a{i}.png")
    assert_clean_failure(run_lora("--model", "tiny", "--data", "folder", "--data-root", str(tmp_path)),
                         "a0.png", "size of their image")


def test_unreadable_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"a{i}.png").write_bytes(b"\x89PNG truncated")
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "masks" / f"a{i}.png")
    assert_clean_failure(run_lora("--model", "tiny", "--data", "folder", "--data-root", str(tmp_path)),
                         "cannot read image")


def test_mask_values_that_are_not_class_ids(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "images" / f"a{i}.png")
        Image.fromarray(np.full((40, 40), 7, np.uint8)).save(tmp_path / "masks" / f"a{i}.png")
    assert_clean_failure(run_lora("--model", "tiny", "--data", "folder", "--data-root", str(tmp_path)),
                         "class ids")


def test_cuda_without_a_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_clean_failure(run_lora("--model", "tiny", "--device", "cuda"), "no CUDA GPU")


@pytest.mark.parametrize("argv,needle", [
    (["--img-size", "0"], "--img-size 0 must be at least 16"), (["--lr", "nan"], "--lr nan must be a positive"),
    (["--lr", "-1"], "--lr -1.0 must be a positive"), (["--weight-decay", "nan"], "--weight-decay nan must be"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"), (["--num-classes", "0"], "--num-classes 0"),
    (["--zoom", "-1"], "--zoom -1 must be at least 0"), (["--synthetic-test", "0"], "--synthetic-test 0"),
    (["--log-every", "0"], "--log-every 0"), (["--steps", "-5"], "--steps -5 must be at least 1"),
    (["--warmup", "-5"], "--warmup -5 must be at least 0")])
def test_impossible_numbers_end_in_one_sentence(argv, needle, tmp_path):
    import lora
    from data import UserError
    with pytest.raises(UserError, match=needle.replace("-", r"\-").replace(".", r"\.")):
        lora.main(["--model", "tiny", "--device", "cpu", "--out", str(tmp_path), *argv])
    assert not (tmp_path / "lora_synthetic_tiny_s0").exists()  # stopped before anything was written


def test_samora_hl_heads_zero_is_one_sentence(tmp_path):
    import samora
    from data import UserError
    with pytest.raises(UserError, match="--hl-heads 0"):
        samora.main(["--model", "tiny", "--device", "cpu", "--hl-heads", "0", "--out", str(tmp_path)])

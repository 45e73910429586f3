"""unet.py: the U-Net baseline trains by the shared loop, and its own arguments fail in one sentence."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unet

ROOT = Path(__file__).resolve().parents[1]


def test_output_has_the_input_resolution_and_one_logit_per_class():
    net = unet.UNet(num_classes=3, img_size=64, width=4)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 4, 64, 64)
    assert net.base_keys == set()  # nothing pretrained: every weight is saved


def test_a_tiny_run_trains_and_beats_its_untrained_start(tmp_path, one_thread):
    unet.main(["--device", "cpu", "--img-size", "64", "--width", "8", "--steps", "60", "--batch-size", "4",
               "--eval-every", "60", "--out", str(tmp_path), "--run-name", "u"])
    metrics = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert metrics["method"] == "unet" and metrics["img_size"] == 64 and metrics["zoom"] == 1
    assert metrics["dice"] > metrics["untrained_dice"] + 0.2


@pytest.mark.parametrize("argv, needle", [
    (["--model", "vit_b"], "--model and --checkpoint do not apply"),
    (["--img-size", "100"], "not a multiple of 16"),
    (["--width", "0"], "--width 0 must be at least 1"),
])
def test_bad_arguments_are_one_sentence(tmp_path, argv, needle):
    proc = subprocess.run([sys.executable, str(ROOT / "unet.py"), "--device", "cpu", "--out", str(tmp_path), *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and needle in proc.stderr

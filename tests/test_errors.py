"""Bad input ends in one sentence on stderr and exit status 2, never a traceback."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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


TINY = ["--model", "tiny", "--device", "cpu", "--img-size", "64", "--steps", "2", "--batch-size", "2",
        "--synthetic-train", "2", "--synthetic-test", "1"]


def folder_dataset(root, n=3):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "images" / f"a{i}.png")
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "masks" / f"a{i}.png")


@pytest.mark.parametrize("listed,needle", [("a0\na1\na2\n", "nothing to train on"), ("\n", "nothing to test on")])
def test_a_test_list_of_every_case_or_of_none(tmp_path, listed, needle):
    import lora
    from data import UserError
    folder_dataset(tmp_path)
    (tmp_path / "test.txt").write_text(listed)
    with pytest.raises(UserError, match=needle):
        lora.main([*TINY, "--data", "folder", "--data-root", str(tmp_path), "--out", str(tmp_path / "runs")])


def test_two_files_of_one_name_are_named_and_nothing_comes_before_the_error(tmp_path):
    folder_dataset(tmp_path)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "images" / "a1.jpg")
    # MobileSAM: mobile_sam and timm (whose imports warn) are imported, the model built, before the data is read
    proc = run_lora("--model", "mobile_sam", "--steps", "1", "--data", "folder", "--data-root", str(tmp_path),
                    "--out", str(tmp_path / "runs"))
    images = tmp_path / "images"
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {images / 'a1.jpg'} and {images / 'a1.png'} have the same name; remove one of them (which one to use "
        f"is not clear)."]
    assert "Warning" not in proc.stdout


def interrupt():
    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process now


@pytest.mark.parametrize("phase", ["build_model", "load_data", "evaluate", "save_pictures"])
def test_ctrl_c_outside_the_training_loop_is_one_line_and_status_130(tmp_path, capsys, monkeypatch, phase):
    """Model building, data loading, the first (untrained) evaluation, the pictures after training."""
    import cli
    import lora
    original = getattr(cli, phase)

    def interrupted(*a, **k):
        interrupt()
        return original(*a, **k)
    monkeypatch.setattr(cli, phase, interrupted)
    with pytest.raises(SystemExit) as stopped:
        cli.main_guard(lambda: lora.main([*TINY, "--out", str(tmp_path), "--run-name", "r"]))
    assert stopped.value.code == 130
    last = tmp_path / "r" / "last.pt"
    assert capsys.readouterr().err.splitlines() == [
        f"interrupted; {last} holds the last saved state: continue with --resume {last}." if phase == "save_pictures"
        else "interrupted; nothing was saved: run the command again."]


@pytest.mark.parametrize("where", ["checkpoint", "pictures"])
def test_a_full_disk_is_one_sentence_and_the_last_checkpoint_stays(tmp_path, monkeypatch, where):
    import cli
    import lora
    from data import UserError
    run, full = tmp_path / "r", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        if where == "checkpoint":  # the disk fills up while last.pt of step 4 is written
            fsync, written = os.fsync, []

            def fsync_or_full(fd):
                if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("last.pt."):
                    written.append(fd)
                    if len(written) == 2:
                        raise full
                return fsync(fd)
            patch.setattr(os, "fsync", fsync_or_full)
        else:
            patch.setattr(cli, "save_pictures", lambda *a, **k: (_ for _ in ()).throw(full))
        with pytest.raises(UserError) as error:
            lora.main([*TINY, "--steps", "4", "--eval-every", "2", "--out", str(tmp_path), "--run-name", "r"])
    last = run / "last.pt"
    assert str(error.value).startswith("the disk is full (No space left on device" + (
        f" writing {last})" if where == "checkpoint" else ")"))
    assert str(error.value).endswith(
        f"; {last} holds the last saved state: free some space, then continue with --resume {last}.")
    assert torch.load(last, weights_only=True)["step"] == (2 if where == "checkpoint" else 4)
    assert not list(run.rglob("*.tmp")) and not (run / "metrics.json").exists()
    lora.main(["--resume", str(last)])  # with space again, the run finishes
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4


def test_outputs_that_cannot_be_written_are_refused_before_the_model_is_built(tmp_path, monkeypatch):
    import cli
    import common
    import lora
    from data import UserError
    args = lora.parse_args(TINY)
    common.save_checkpoint(tmp_path / "c.pt", common.load_sam(args, cli.setup(args, "lora", 1)), args)
    afile = tmp_path / "afile"
    afile.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes where a mode forbids it; /sys takes no new files
        locked = Path("/sys")
    monkeypatch.setattr(cli, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    export = ["--resume", str(tmp_path / "c.pt"), "--export-merged"]
    for argv, needle in [
            (["--out", str(afile)], f"--out {afile} cannot be written: {afile} is a file, not a folder"),
            (["--out", str(afile / "runs")], f"--out {afile / 'runs'} cannot be written: {afile} is a file"),
            (["--out", str(locked / "runs")], f"--out {locked / 'runs'} cannot be written ("),
            ([*export, str(tmp_path)], f"--export-merged {tmp_path} is a folder; pass a file name"),
            ([*export, str(afile / "m.pth")], f"--export-merged {afile / 'm.pth'} cannot be written: {afile} is a file"),
            ([*export, str(locked / "m.pth")], f"--export-merged {locked / 'm.pth'} cannot be written (")]:
        with pytest.raises(UserError) as error:
            lora.main([*TINY, *argv])
        assert needle in str(error.value)


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    import lora
    run = tmp_path / "r"
    lora.main([*TINY, "--out", str(tmp_path), "--run-name", "r"])
    kill = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from common import atomic_write; "
            "atomic_write(sys.argv[2], lambda f: (f.write(b'half a checkpoint'), f.flush(), "
            "os.kill(os.getpid(), signal.SIGKILL)))")
    assert subprocess.run([sys.executable, "-c", kill, str(ROOT), str(run / "last.pt")]).returncode == -signal.SIGKILL
    assert len(list(run.glob("last.pt.*.tmp"))) == 1  # kill -9 inside the write: its temporary file stays
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2  # beside the whole checkpoint
    lora.main(["--resume", str(run / "last.pt")])
    assert not list(run.rglob("*.tmp"))

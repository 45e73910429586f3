"""train.py: runs methods x data x seeds as subprocesses, skips finished runs, writes the table, the plot
and (for DRIVE) the prediction panel."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--", "--model", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2"]


def test_runs_every_seed_reports_mean_and_std_and_skips_finished_runs(tmp_path, capsys):
    argv = ["--methods", "lora", "--data", "synthetic", "--seeds", "0", "1", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), *TINY]
    train.main(argv)
    for seed in (0, 1):
        assert (tmp_path / "runs" / f"lora_synthetic_s{seed}" / "metrics.json").is_file()
    table = (tmp_path / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| `lora`"))
    assert " ± " in row and row.rstrip().endswith("| 2 |")  # mean ± std over the 2 seeds
    assert "lora.py --data synthetic --seed S" in table  # the command behind the row, seed left open
    assert (tmp_path / "results.png").is_file()
    capsys.readouterr()
    train.main(argv)  # everything is there: nothing runs again
    assert "0 runs to do" in capsys.readouterr().out


def test_a_failed_run_is_named_and_the_exit_is_non_zero(tmp_path):
    with pytest.raises(SystemExit, match="1 runs failed.*salt_rank_0_synthetic_s0"):
        train.main(["--methods", "salt --rank 0", "--data", "synthetic", "--seeds", "0", "--out", str(tmp_path),
                    "--results", str(tmp_path / "r"), *TINY])


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown method 'sam2'"):
        train.main(["--methods", "sam2", "--out", str(tmp_path)])


def test_panel_shows_each_method_on_the_first_drive_test_image(tmp_path, drive_root):
    """Report-only from two finished DRIVE runs (metrics.json and test_masks/ as cli.run writes them)."""
    shape = np.array(Image.open(drive_root / "training" / "1st_manual" / "35_manual1.gif")).shape
    for name, spec_args in (("lora_drive_s0", {}), ("salt_rank_4_drive_s0", {"rank": 4})):
        run = tmp_path / "runs" / name
        (run / "test_masks").mkdir(parents=True)
        Image.fromarray((np.random.default_rng(0).random(shape) > 0.9).astype(np.uint8)).save(run / "test_masks" / "35.png")
        metrics = dict(method=name.split("_")[0], data="drive", model="mobile_sam", seed=0, dice=0.5, hd95=3.0,
                       per_image=[dict(name="35", dice=0.5, hd95=3.0)], trainable_params=10, trainable_percent=1.0,
                       peak_mem_gib=1.0, train_seconds=1.0, imgs_per_s=1.0, versions={}, args=dict(split="salt", **spec_args))
        (run / "metrics.json").write_text(json.dumps(metrics))
    train.main(["--report-only", "--methods", "lora", "salt --rank 4", "--data", "drive", "--data-root", str(drive_root),
                "--seeds", "0", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "drive")])
    assert "`salt --rank 4` | drive" in (tmp_path / "drive.md").read_text()
    panel = Image.open(tmp_path / "drive_panel.png")
    assert panel.size[0] > panel.size[1]  # a grid of image, ground truth and the two methods
    shutil.rmtree(tmp_path / "runs" / "lora_drive_s0" / "test_masks")  # a run without masks: no panel, no error
    (tmp_path / "drive_panel.png").unlink()
    train.main(["--report-only", "--methods", "lora", "--data", "drive", "--data-root", str(drive_root),
                "--seeds", "0", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "drive")])
    assert not (tmp_path / "drive_panel.png").exists()


def test_a_missing_drive_folder_for_the_panel_is_one_sentence_and_exit_2(tmp_path):
    run = tmp_path / "runs" / "lora_drive_s0"
    (run / "test_masks").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(dict(
        method="lora", data="drive", model="mobile_sam", seed=0, dice=0.5, hd95=3.0, per_image=[],
        trainable_params=10, trainable_percent=1.0, peak_mem_gib=None, train_seconds=1.0, imgs_per_s=1.0,
        versions={}, args=dict(split="salt"))))
    done = subprocess.run([sys.executable, "train.py", "--report-only", "--methods", "lora", "--data", "drive",
                           "--data-root", str(tmp_path / "no_drive"), "--seeds", "0", "--out", str(tmp_path / "runs"),
                           "--results", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: DRIVE folder {tmp_path / 'no_drive'} does not exist")


def test_report_only_without_runs_is_one_sentence_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "--report-only", "--methods", "lora", "--data", "synthetic",
                           "--seeds", "0", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "r")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: no finished runs under {tmp_path / 'runs'}")
    assert not (tmp_path / "r.md").exists()


def test_results_table_is_what_its_committed_runs_give(tmp_path):
    """results/drive.md and results/jsrt.md, the tables the README quotes, rebuilt from the per-run metrics.json
    files committed under results/runs by the README's own command (REPORT_ONLY=1 scripts/results.sh): a table
    edited by hand, or a run's file changed or removed, fails here. The data roots are only text in the tables'
    command lines (no panel: the runs' masks are not committed), so the data need not be here. PYTHON: this
    interpreter."""
    tables = tmp_path / "tables"  # not there yet: train.py makes the folder
    env = {**os.environ, "PYTHON": sys.executable, "REPORT_ONLY": "1", "RESULTS": str(tables)}
    done = subprocess.run(["bash", "scripts/results.sh", "data/DRIVE", "data/JSRT_SCR"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for table in ("drive.md", "jsrt.md"):
        assert (tables / table).read_text() == (ROOT / "results" / table).read_text()


def test_per_class_table_names_its_columns():
    """--class-names heads the per-class columns; classes past the names, and rows with one class, as before."""
    def run(seed, dice):
        return ({"dice_per_class": dice, "hd95_per_class": [1.0] * len(dice), "hd95": 2.0, "hd95_unit": "px",
                 "seed": seed}, [], None)
    rows = {("unet", "folder"): [run(0, [0.9, 0.8, 0.7]), run(1, [0.7, 0.8, 0.9])],
            ("lora", "drive"): [run(0, [0.8])]}
    named = "\n".join(train.per_class_table(rows, ["lung", "heart"]))
    assert "| method | data | lung | heart | class 3 | HD95 |" in named
    row = next(line for line in named.splitlines() if line.startswith("| `unet`"))
    assert "| 0.800 ± 0.141 | 0.800 ± 0.000 |" in row  # class 1: mean ± std over the two seeds
    assert "`lora`" not in named  # one class: no per-class row
    assert "| class 1 | class 2 | class 3 |" in "\n".join(train.per_class_table(rows))

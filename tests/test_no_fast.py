"""The fast layer (fast/) is optional: with --no-fast no part of it is imported, and a copy of the repository
without the folder trains every method (the same training, only slower)."""
import importlib
import importlib.abc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lora", "atrous_lora", "salt", "balr_sam", "samora"]
TINY = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--synthetic-train", "2",
        "--synthetic-test", "1"]
EXTRA = dict(samora=["--stage1-steps", "1"])  # stage 1 (three experts) then stage 2, as --stage both runs


class RefuseFast(importlib.abc.MetaPathFinder):
    """Records every attempt to import fast or a module of it, and answers as if the folder were not there."""

    def __init__(self):
        self.asked = []

    def find_spec(self, name, path=None, target=None):
        if name == "fast" or name.startswith("fast."):
            self.asked.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def test_no_fast_trains_every_method_without_importing_the_fast_layer(tmp_path, monkeypatch):
    """main() of each method with --no-fast writes its metrics.json and never imports fast (an import would
    have to come through the finder: the fast layer's modules are taken out of sys.modules first)."""
    for name in [m for m in sys.modules if m == "fast" or m.startswith("fast.")]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    finder = RefuseFast()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    for method in METHODS:
        mod = importlib.import_module(method)
        metrics = mod.main([*TINY, *EXTRA.get(method, []), "--no-fast", "--out", str(tmp_path), "--run-name", method])
        saved = json.loads((tmp_path / method / "metrics.json").read_text())
        assert saved["method"] == method and saved["args"]["no_fast"] is True and saved["steps"] == 2
        assert 0 <= metrics["dice"] <= 1
    assert finder.asked == [], finder.asked


def test_a_copy_without_the_fast_folder_trains_every_method(tmp_path):
    """The repository's Python files without fast/, each method run as a script there (no --no-fast: the
    fast layer is simply absent): every one trains and writes metrics.json, and the copy can import no module
    named fast from anywhere."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for path in ROOT.glob("*.py"):
        shutil.copy(path, repo)
    assert not (repo / "fast").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"  # five small runs side by side
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('fast'))"],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr
    runs = {method: subprocess.Popen([sys.executable, f"{method}.py", *TINY, *EXTRA.get(method, []),
                                      "--out", str(tmp_path / "runs"), "--run-name", method],
                                     cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for method in METHODS}
    failed = {}
    for method, proc in runs.items():
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failed[method] = "timed out\n" + out[-2000:]
            continue
        if proc.returncode != 0:
            failed[method] = out[-2000:]
    assert not failed, "\n\n".join(f"{m}:\n{o}" for m, o in failed.items())
    for method in METHODS:
        saved = json.loads((tmp_path / "runs" / method / "metrics.json").read_text())
        assert saved["method"] == method and saved["args"]["no_fast"] is False and saved["steps"] == 2

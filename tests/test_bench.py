"""benchmarks/bench.py on the tiny model (CPU): every row measured or skipped with a reason, FLOPs counted,
JSON and markdown written, --append keeps earlier rows."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402

CONFIGS = ["stock", "fast", "fast_ckpt", "fast_compile"]  # on the CPU all fp32



def test_bench_smoke_on_tiny(tmp_path, one_thread):
    common_args = ["--model", "tiny", "--quick", "--batches", "1", "--device", "cpu", "--out", str(tmp_path),
                   "--baseline", "stock"]
    result = bench.main(common_args + ["--configs", ",".join(CONFIGS)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(result))
    rows = {r["config"]: r for r in saved["rows"]}
    assert list(rows) == CONFIGS
    assert rows["fast_compile"]["status"].startswith("skipped")  # compile: CUDA only
    for c in CONFIGS[:3]:
        r = rows[c]
        assert "status" not in r, r
        assert r["train"]["imgs_per_s"] > 0 and r["infer"]["imgs_per_s"] > 0
        assert r["train"]["peak_gib"] is None  # no CUDA memory on the CPU
        assert 0 < r["mfu_train"] < 1
    stock, fast = rows["stock"], rows["fast"]
    # the model's FLOPs: forward + backward > forward > 0, and the stock config executes exactly those
    assert stock["model_flops_train"] > stock["model_flops_infer"] > 0
    assert stock["exec_flops_train"] == stock["model_flops_train"]
    # the fast path folds rel-pos into wider q.k (and pads v): more FLOPs executed, the same model FLOPs
    assert fast["exec_flops_train"] > fast["model_flops_train"] == stock["model_flops_train"]
    table = (tmp_path / "bench.md").read_text()
    assert all(f"| {c} |" in table for c in CONFIGS) and "1.00×" in table  # the baseline's own ratio

    bench.main(common_args + ["--configs", "fast", "--no-flops", "--no-inference", "--append"])
    again = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["config"] for r in again] == ["stock", "fast_ckpt", "fast_compile", "fast"]
    assert "infer" not in again[-1] and "model_flops_train" not in again[-1]

    other = tmp_path / "other.json"  # --merge: rows of another run join, a row measured in both is the later one
    other.write_text(json.dumps(dict(meta=saved["meta"], rows=[dict(saved["rows"][0], batch=8),
                                                                dict(saved["rows"][1], status="skipped: test")])))
    merged = bench.main(["--merge", str(tmp_path / "bench.json"), str(other), "--out", str(tmp_path / "merged")])
    keys = [(r["config"], r["batch"]) for r in merged["rows"]]
    assert sorted(keys) == sorted([(c, 1) for c in CONFIGS] + [("stock", 8)])
    assert {r["config"]: r for r in merged["rows"] if r["batch"] == 1}["fast"]["status"] == "skipped: test"
    assert (tmp_path / "merged" / "bench.md").is_file()


def test_bad_config_is_a_user_error():
    with pytest.raises(bench.UserError, match="fast_compile"):  # the message's example
        bench.parse_args(["--configs", "fast_bf17"])

"""Using a trained adapter: resume after an interruption, predict on a folder, export merged weights."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import common
import lora
import metrics
from data import load_data

ROOT = Path(__file__).resolve().parents[1]


def setup_tiny(tmp_path, extra=()):
    args = lora.parse_args(["--model", "tiny", "--device", "cpu", "--steps", "10", "--batch-size", "2",
                            "--warmup", "3", "--log-every", "2", "--out", str(tmp_path), *extra])
    device = cli.setup(args, "lora", gpu_steps=10)
    model = common.load_sam(args, device)
    lora.inject(model, args.rank)
    return args, device, model


def interrupt():
    os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered to this process now


def train(tmp_path, name, resume=None, interrupt_in=None, at=6):
    """Ten tiny LoRA steps, evaluated every 4; with `interrupt_in`, a real SIGINT arrives inside that phase of
    step `at` (or of the `at`-th evaluation or checkpoint write)."""
    args, device, model = setup_tiny(tmp_path, ["--eval-every", "4"])
    ckpt = common.load_checkpoint(resume, model, args) if resume else None
    train_set, test_set = load_data(args, device)
    calls = dict(forward=0, backward=0, optimiser=0, schedule=0, evaluation=0, saving=0)

    def phase(name):
        calls[name] += 1
        if interrupt_in == name and calls[name] == at:
            interrupt()

    def loss_fn(m, x, y):
        phase("forward")
        loss = common.default_loss(m, x, y)
        loss.register_hook(lambda grad: phase("backward"))  # runs inside loss.backward()
        return loss

    def evaluate():
        phase("evaluation")
        return metrics.evaluate(model, test_set, 2)[0]

    step, schedule_step, save = torch.optim.AdamW.step, torch.optim.lr_scheduler.LambdaLR.step, common.save_checkpoint
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (phase("optimiser"), step(self, *a, **k))[1])
        patch.setattr(torch.optim.lr_scheduler.LambdaLR, "step",
                      lambda self, *a, **k: (phase("schedule"), schedule_step(self, *a, **k))[1])
        patch.setattr(common, "save_checkpoint", lambda *a, **k: (phase("saving"), save(*a, **k))[1])
        common.train_loop(model, common.labelled_batches(train_set, args.batch_size, args.generator), loss_fn, args,
                          device, tmp_path / name, args.steps, evaluate_fn=evaluate, resume=ckpt)
    return model


# (phase, which call, the step after which the run must stop): a signal inside a step lets that step finish
# (the schedule's first call is LambdaLR's own, at its construction: its 7th is in step 6); inside the 2nd
# evaluation (after step 8) or the 3rd checkpoint write (best.pt or last.pt of step 8), the run stops at 8
PHASES = [("forward", 6, 6), ("backward", 6, 6), ("optimiser", 6, 6), ("schedule", 7, 6),
          ("evaluation", 2, 8), ("saving", 3, 8)]


@pytest.mark.parametrize("phase,at,stop", PHASES)
def test_an_interrupt_in_any_phase_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, phase, at, stop):
    straight = train(tmp_path, "straight")
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path, "interrupted", interrupt_in=phase, at=at)
    assert stopped.value.code == 130
    saved = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)
    assert saved["step"] == stop
    resumed = train(tmp_path, "resumed", resume=tmp_path / "interrupted" / "last.pt")
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    for name, p in a.items():
        if p.requires_grad:
            assert torch.equal(p, b[name]), name


def test_sigterm_is_taken_like_ctrl_c(tmp_path):
    args, device, model = setup_tiny(tmp_path)
    train_set, _ = load_data(args, device)

    def loss_fn(m, x, y):
        os.kill(os.getpid(), signal.SIGTERM)
        return common.default_loss(m, x, y)
    with pytest.raises(SystemExit) as stopped:
        common.train_loop(model, common.labelled_batches(train_set, 2, args.generator), loss_fn, args, device,
                          tmp_path / "t", args.steps)
    assert stopped.value.code == 143
    assert torch.load(tmp_path / "t" / "last.pt", weights_only=True)["step"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back


def test_checkpoint_from_another_method_or_model_is_refused(tmp_path):
    args, device, model = setup_tiny(tmp_path)
    common.save_checkpoint(tmp_path / "x.pt", model, args)
    args.method = "salt"
    with pytest.raises(common.UserError, match="run lora.py"):
        common.load_checkpoint(tmp_path / "x.pt", model, args)
    args.method, args.num_classes = "lora", 3
    with pytest.raises(common.UserError, match="--num-classes 1"):
        common.load_checkpoint(tmp_path / "x.pt", model, args)
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_checkpoint(tmp_path / "missing.pt", model, args)


def test_predict_writes_masks_of_the_original_size(tmp_path):
    metrics = lora.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2",
                         "--out", str(tmp_path), "--run-name", "p"])
    assert metrics is not None
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    lora.main(["--model", "tiny", "--device", "cpu", "--resume", str(tmp_path / "p" / "last.pt"),
               "--predict", str(folder), "--predict-out", str(tmp_path / "out")])
    mask = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert mask.shape == (70, 90) and set(np.unique(mask)) <= {0, 1}
    assert (tmp_path / "out" / "a_overlay.jpg").is_file()


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    args, device, model = setup_tiny(tmp_path)
    train_set, _ = load_data(args, device)
    with pytest.raises(common.UserError, match="NaN or infinite by step 1;"):  # short runs log every step
        common.train_loop(model, common.labelled_batches(train_set, 2, args.generator),
                          lambda m, x, y: common.default_loss(m, x, y) * float("nan"), args, device,
                          tmp_path / "nan", 10)


@pytest.mark.parametrize("method", ["lora", "salt"])
def test_exported_weights_load_into_stock_mobile_sam_and_predict_the_same(tmp_path, method):
    """The merged state dict loads into mobile_sam's own registry model (strict) with no code from
    this repository and gives the adapter model's logits."""
    from mobile_sam import sam_model_registry
    import salt
    module = {"lora": lora, "salt": salt}[method]
    args = module.parse_args(["--device", "cpu", "--steps", "1", "--img-size", "1024"])  # stock SAM's input
    device = cli.setup(args, method, gpu_steps=1)
    model = common.load_sam(args, device)
    if method == "lora":
        lora.inject(model, 4)
    else:
        salt.inject(model, args)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if p.requires_grad and ("lora_B" in n or "salt_" in n):
            p.data.add_(torch.randn_like(p) * 0.02)  # a non-trivial update to fold
    common.save_checkpoint(tmp_path / "a.pt", model, args)
    module.main(["--device", "cpu", "--resume", str(tmp_path / "a.pt"), "--export-merged", str(tmp_path / "m.pth")])
    stock = sam_model_registry["vit_t"]()
    stock.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=True)
    model.eval(), stock.eval()
    x = torch.rand(1, 3, 1024, 1024)
    with torch.no_grad():
        ours = model(x)
        emb = stock.image_encoder((x * 255 - stock.pixel_mean) / stock.pixel_std)
        sparse, dense = stock.prompt_encoder(None, None, None)
        theirs, _ = stock.mask_decoder.predict_masks(emb, stock.prompt_encoder.get_dense_pe(), sparse, dense)
    assert torch.allclose(ours, theirs[:, :2], atol=1e-3, rtol=1e-3)


def test_methods_that_do_not_fold_refuse_to_export(tmp_path):
    import balr_sam
    args = balr_sam.parse_args(["--model", "tiny", "--device", "cpu"])
    device = cli.setup(args, "balr_sam", gpu_steps=1)
    model = common.load_sam(args, device)
    balr_sam.inject(model, args.rank, args.decoder_rank, args.cden_width)
    common.save_checkpoint(tmp_path / "b.pt", model, args)
    with pytest.raises(common.UserError, match="does not fold"):
        balr_sam.main(["--model", "tiny", "--device", "cpu", "--resume", str(tmp_path / "b.pt"),
                       "--export-merged", str(tmp_path / "m.pth")])


TINY_RUN = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--synthetic-train", "2",
            "--synthetic-test", "1"]


def test_a_run_folder_is_never_silently_mixed_or_shared(tmp_path):
    out = ["--out", str(tmp_path), "--run-name", "r"]
    lora.main([*TINY_RUN, *out])
    first = (tmp_path / "r" / "metrics.json").read_text()
    with pytest.raises(common.UserError, match="already holds a run .*--resume .*--overwrite"):
        lora.main([*TINY_RUN, *out])  # the same command again: refused, the first run untouched
    assert (tmp_path / "r" / "metrics.json").read_text() == first
    (tmp_path / "r" / "stale.txt").write_text("from the first run")
    lora.main([*TINY_RUN, *out, "--overwrite", "--seed", "1"])  # replaced whole: nothing of the first run stays
    assert not (tmp_path / "r" / "stale.txt").exists()
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["seed"] == 1
    import fcntl
    while cli._CLAIMS:  # this process's run has ended: it gives its folder up
        cli._CLAIMS.pop().close()
    with (tmp_path / "r" / ".lock").open("a") as lock:  # as if another process held the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run([sys.executable, str(ROOT / "lora.py"), *TINY_RUN, *out, "--overwrite"],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "is in use by another run" in done.stderr.splitlines()[-1]
    with pytest.raises(common.UserError, match="not a plain folder name"):
        lora.main([*TINY_RUN, "--out", str(tmp_path), "--run-name", "../../x"])


def test_predict_and_export_never_overwrite_what_they_read(tmp_path):
    lora.main([*TINY_RUN, "--out", str(tmp_path), "--run-name", "r"])
    adapter = tmp_path / "r" / "adapter.json"
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(scans / "a.png")
    with pytest.raises(common.UserError, match="folder of the scans"):
        lora.main(["--device", "cpu", "--resume", str(adapter), "--predict", str(scans), "--predict-out", str(scans)])
    assert np.asarray(Image.open(scans / "a.png")).ndim == 3  # the scan is still the scan
    lora.main(["--device", "cpu", "--resume", str(adapter), "--predict", str(scans)])
    with pytest.raises(common.UserError, match="a.png exists"):
        lora.main(["--device", "cpu", "--resume", str(adapter), "--predict", str(scans)])
    last = tmp_path / "r" / "last.pt"
    with pytest.raises(common.UserError, match="is the checkpoint being read"):
        lora.main(["--device", "cpu", "--resume", str(last), "--export-merged", str(last)])


def printed_resume(capsys):
    """The `--resume PATH` that an interrupted run printed (train_loop on stdout, main_guard on stderr)."""
    out = capsys.readouterr()
    return ["--resume", re.findall(r"continue with --resume (.+?\.pt)", out.out + out.err)[-1]]


TIMES = ("train_seconds", "imgs_per_s", "seconds")  # wall times: a resumed run's add up over its segments


def assert_same_but_times(straight, resumed, where="metrics"):
    """metrics.json of two runs, key by key: equal but for wall times (and NaN equals NaN)."""
    if isinstance(straight, dict):
        assert set(straight) == set(resumed), where
        for k in straight:
            if k not in TIMES:
                assert_same_but_times(straight[k], resumed[k], f"{where}.{k}")
    elif isinstance(straight, list):
        assert len(straight) == len(resumed), where
        for i, (a, b) in enumerate(zip(straight, resumed)):
            assert_same_but_times(a, b, f"{where}[{i}]")
    else:
        assert straight == resumed or straight != straight and resumed != resumed, (where, straight, resumed)


def assert_resumed_like_straight(straight_dir, resumed_dir, saved_seconds):
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (straight_dir, resumed_dir))
    assert a["state"].keys() == b["state"].keys()
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    m, n = (json.loads((d / "metrics.json").read_text()) for d in (straight_dir, resumed_dir))
    for key in ("resume", "out", "run_name"):
        m["args"].pop(key), n["args"].pop(key)
    assert_same_but_times(m, n)
    assert n["train_seconds"] > saved_seconds > 0  # the interrupted segment's time is counted
    assert (straight_dir / "log.csv").read_text() == (resumed_dir / "log.csv").read_text()


# 40 steps: a progress line (and a loss point) every 2 steps, so a run can stop inside a logging interval
LONG = ["--model", "tiny", "--device", "cpu", "--img-size", "32", "--steps", "40", "--batch-size", "1",
        "--log-every", "2", "--eval-every", "20", "--synthetic-train", "2", "--synthetic-test", "1"]



@pytest.fixture(scope="module")
def straight_long(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("straight")
    lora.main([*LONG, "--out", str(out), "--run-name", "straight"])
    torch.set_num_threads(n)
    return out / "straight"


@pytest.mark.parametrize("where", ["optimiser", "pictures"])
def test_a_resumed_run_writes_the_metrics_of_the_uninterrupted_one(tmp_path, capsys, straight_long, where,
                                                                   one_thread):
    """Ctrl-C inside step 3 (the logging interval 3-4 then resumes with step 3's loss in its mean), or while the
    pictures are written (the final evaluation is done again); `--resume` as printed is the whole command."""
    calls = []

    def then_interrupt(original):
        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == 3 or where == "pictures":
                interrupt()
            return original(*a, **k)
        return wrapped
    with pytest.MonkeyPatch.context() as patch:
        if where == "optimiser":
            patch.setattr(torch.optim.AdamW, "step", then_interrupt(torch.optim.AdamW.step))
        else:
            patch.setattr(cli, "save_pictures", then_interrupt(cli.save_pictures))
        with pytest.raises(SystemExit) as stopped:
            cli.main_guard(lambda: lora.main([*LONG, "--out", str(tmp_path), "--run-name", "cut"]))
    assert stopped.value.code == 130
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["step"] == (3 if where == "optimiser" else 40)
    if where == "optimiser":
        assert saved["running"] > 0  # step 3's loss, for the mean of steps 3 and 4
    command = printed_resume(capsys)
    assert command == ["--resume", str(tmp_path / "cut" / "last.pt")]
    lora.main(command)
    assert_resumed_like_straight(straight_long, tmp_path / "cut", saved["history"]["seconds"])


SAMORA = ["--model", "tiny", "--device", "cpu", "--img-size", "64", "--steps", "2", "--stage1-steps", "3",
          "--batch-size", "2", "--synthetic-train", "3", "--synthetic-test", "1"]


def test_samora_stage_one_resumes_with_the_command_it_prints_and_its_checkpoints_predict(tmp_path, capsys, one_thread):
    import samora
    samora.main([*SAMORA, "--out", str(tmp_path), "--run-name", "straight"])
    calls, patch_loss = [], samora.LOSSES["patch"]

    def interrupted(*a):  # Ctrl-C in the second step of the second expert
        calls.append(1)
        if len(calls) == 2:
            interrupt()
        return patch_loss(*a)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(samora.LOSSES, "patch", interrupted)
        with pytest.raises(SystemExit) as stopped:
            samora.main([*SAMORA, "--out", str(tmp_path), "--run-name", "cut"])
    assert stopped.value.code == 130
    stage1 = tmp_path / "cut" / "stage1" / "last.pt"
    saved = torch.load(stage1, weights_only=True)
    assert saved["tag"] == "stage1-patch " and saved["step"] == 2 and list(saved["keep"]["experts"]) == ["image"]
    command = printed_resume(capsys)
    assert command == ["--resume", str(stage1)]
    samora.main(command)
    assert_resumed_like_straight(tmp_path / "straight", tmp_path / "cut", saved["history"]["seconds"])

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(scans / "a.png")
    for i, checkpoint in enumerate(("best.pt", "last.pt", "adapter.json")):  # no --stage needed
        samora.main(["--device", "cpu", "--resume", str(tmp_path / "cut" / checkpoint), "--predict", str(scans),
                     "--predict-out", str(tmp_path / f"masks{i}")])
        assert (tmp_path / f"masks{i}" / "a.png").is_file()
    with pytest.raises(common.UserError, match="is a stage-1 checkpoint .* continue it with --resume alone"):
        samora.main(["--device", "cpu", "--resume", str(stage1), "--predict", str(scans)])

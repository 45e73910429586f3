"""BALR-SAM: a boundary-detail CNN, low-rank adapters in the ViT blocks, low-rank attention in the decoder.

Paper: Liu et al., "BALR-SAM: Boundary-Aware Low-Rank Adaptation of SAM for Resource-Efficient Medical
Image Segmentation", arXiv 2509.24204 (2025). No code has been published ("will be open-sourced upon
acceptance"), and only the abstract and summaries could be read, so the architecture here is our
reconstruction of its description. What the paper states, and this file keeps:
  1. CDEN, a "Complementary Detail Enhancement Network" of depthwise-separable convolutions with
     multi-scale fusion, giving boundary-sensitive features to SAM;
  2. low-rank adapters inside the image encoder's ViT blocks;
  3. "low-rank tensor attention" in the mask decoder, said to cut its memory by 75% and speed it up;
  4. no prompts.
What is ours (changes relative to lora.py, which this file follows):
  1. CDEN (`cden.*`) runs on the normalised image (B, 3, S, S): a stride-2 3x3 stem, then two
     depthwise-separable blocks (DW3x3 -> norm -> GELU -> PW1x1 -> norm -> GELU) per stage at strides
     4, 8 and 16 (widths w, 2w, 4w, w = --cden-width), then fusion: the 1/8 and 1/16 maps are upsampled
     to 1/4, concatenated with the 1/4 map and mixed by a 1x1 conv to w channels. The fused map joins SAM
     twice, each time through a zero-initialised 1x1 conv, so the model starts as stock SAM:
       (i)  average-pooled to 1/16 and added to the image embedding (B, 256, S/16, S/16);
       (ii) at 1/4 added to the decoder's upscaled features (B, 32, S/4, S/4) right before the hypernetwork
            product, where SAM forms the mask and loses boundaries (it upsamples 1/16 features by 4).
     The norm is GroupNorm(8 groups), not BatchNorm: batches here are 2 (CPU) to 8 (GPU) images and
     evaluation runs in eval mode at any batch size; GroupNorm behaves the same in training and evaluation,
     needs no running statistics (nothing to save beside the weights) and does not depend on the batch.
  2. In every encoder block: q/v LoRA on the attention qkv exactly as lora.py (SAMed), plus LoRA on both MLP
     linears (lin1/lin2 in SAM's ViT, fc1/fc2 in MobileSAM's TinyViT): W x + B A x, rank --rank, B = 0.
  3. The mask decoder's two-way transformer runs its attentions between the T tokens and the N image tokens
     in low-rank form (LowRankTwoWayTransformer; same modules, weights and state-dict keys as stock):
       token -> image (both blocks and the final attention): keys and values come from the image tokens
         averaged over an r x r grid of equal cells, r = --decoder-rank (a divisor of the grid side): the
         N = 4,096 columns of the attention become r^2 = 1,024 at r = 32 (75% fewer), and the 4,096-row k and
         v projections 1,024-row ones.
         As a matrix over the tokens the pooling is Linformer's projection E (Wang et al., arXiv 2006.04768,
         which names pooling as one choice of E), here separable over the grid's two axes, E = P_h (x) P_w,
         a rank-(r, r) Tucker projection of the (h, w) modes: the "tensor" of the paper's name, as we read it.
         It is fixed (no parameters), so it keeps nothing for the backward pass. Exact where the image
         tokens are constant over each cell; at r >= the grid side it is the identity (stock SAM).
       image -> token (both blocks): exact. The output, N x C, is P (N x H*T) times M (H*T x C), of rank at
         most H*T = 40 (8 heads, 5 tokens), and is computed that way (image_to_token), without the stock
         form's (N x C/2) queries, per-head outputs and their merge.
     The whole decoder trains, as in lora.py (SAMed); the low-rank form adds no parameter.
Where the decoder's memory is (prompt-free, 1024 input: N = 64 x 64 = 4,096 image tokens, T = 5 tokens
(IoU + 4 mask tokens), C = 256, attention width C/2 = 128 in 8 heads, bf16 autocast): the attention
matrices are small (B x 8 x 5 x 4,096), so Linformer's usual target, an N x N matrix, does not exist here.
What is large is everything with N rows: one (B, 4096, 256) tensor is 16 MiB in bf16 and 32 MiB in fp32 at
batch 8. Stock, each token -> image attention projects keys + pe and keys to k and v (N rows each, their
bf16 inputs kept for the backward), each image -> token attention forms q, the per-head outputs and their
merge (N rows each) before out_proj. Those are what the low-rank form removes. What it cannot touch: the
image stream itself (keys + attention output and norm4, kept in fp32), the copies of the embedding that
predict_masks makes, and the upscaling to (B, 64, 128, 128) and (B, 32, 256, 256) with LayerNorm2d's fp32
intermediates, where the inference peak then lies. So the decoder's saving is well short of the paper's 75%;
`--measure-decoder OUT.json` measures time and training and inference peak memory against the stock decoder.
Measured on an H200 (MobileSAM at 1024, batch 8, bf16 autocast, eager; `python balr_sam.py --measure-decoder
decoder.json`), against stock: the whole decoder -17% inference peak (186.4 -> 154.9 MiB), -27% training
peak (571.8 -> 416.6 MiB), but slower, inference 5.24 -> 9.70 ms and training 21.4 -> 25.5 ms (more and
smaller kernels); the transformer alone -26% and -33% peak (182.4 -> 135.1, 478.1 -> 322.4 MiB).
(Factorising the attention's q/k/v weights, W ~ U V, another reading of "low-rank attention", shrinks only
those weights, 0.9 M parameters of the decoder's 4 M: no activation shrinks.)
Differences from the paper's recipe (the paper's from its abstract and summaries: "not stated" is what those
do not give; the loop every method shares is common.py's):
  what           BALR-SAM paper                                 this file
  base model     SAM ViT-H, as "1.8% = 11.7 M" trainable        MobileSAM's TinyViT (--model; vit_b/l/h with
                 parameters implies (about 650 M in all)        --checkpoint)
  loss           not stated                                     0.2 CE + 0.8 foreground Dice on full-size labels
                                                                (lora.py's)
  optimiser      not stated                                     AdamW
  learning rate  not stated                                     1e-3 (--lr; several classes: 3e-3)
  weight decay   not stated                                     0.01 (--weight-decay)
  warm-up        not stated                                     50 steps, linear (--warmup; at most a tenth of --steps)
  schedule       not stated                                     poly 0.9, reaching 0 at the last step
  batch          not stated                                     8 on a GPU, 2 on a CPU (--batch-size)
  length         not stated                                     1000 steps on a GPU (--steps)
  input size     not stated                                     1024 (--img-size); crops of 1/zoom of the image
                                                                (--zoom; DRIVE: 2)
  prompts        none                                           none (the no-mask embedding)
  what trains    CDEN, the encoder's low-rank adapters, the     CDEN; q/v and MLP LoRA in every encoder block
                 decoder's low-rank attention: 11.7 M           (--rank 4; several classes: 32); the whole mask
                                                                decoder (spare tokens' hypernetworks frozen);
                                                                the no-mask embedding
  decoder        "low-rank tensor attention": 75% less memory,  pooled keys/values (--decoder-rank 32) and the
  attention      faster inference (form not published)          exact low-rank image -> token form (above)
  augmentation   not stated                                     flip, rotation +-10 deg, brightness (SALT's)
  data           ISIC-2017, Synapse, polyp segmentation         DRIVE, synthetic vessels, or a folder
The trainable parameters of a run, by part, are in its metrics.json (trainable_by_part); the test
test_trainable_parameters_are_the_adapters_and_the_decoder checks them against a formula.

Run:  python balr_sam.py --data drive --data-root path/to/DRIVE --split salt
      python balr_sam.py --measure-decoder decoder.json     # CUDA: the decoder alone, stock vs low-rank
"""
import copy
import json
import math
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import common
from data import UserError


def parse_args(argv=None):
    p = cli.base_parser("BALR-SAM: detail CNN (CDEN) + LoRA in the ViT blocks + low-rank decoder attention, "
                        "prompt-free.")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank of the encoder's q/v and MLP updates (default: 4; with several classes 32)")
    p.add_argument("--decoder-rank", type=int, default=32,
                   help="r: the decoder's token -> image attentions read the image tokens averaged over an r x r "
                        "grid of equal cells (r divides S/16): r*r keys and values instead of (S/16)^2, 1,024 of "
                        "4,096 at 1024 input; r >= S/16 pools nothing; 0 keeps SAM's decoder as it is")
    p.add_argument("--cden-width", type=int, default=32,
                   help="CDEN channels at 1/4 scale (2x at 1/8, 4x at 1/16); a multiple of 16")
    p.add_argument("--measure-decoder", default=None, metavar="JSON",
                   help="on a CUDA GPU: measure the mask decoder alone, stock against BALR-SAM's low-rank attention "
                        "(--decoder-rank), at --batch-size (default 8) on random image embeddings of the model's "
                        "shape: inference time, and training (forward + backward) and inference peak memory; print "
                        "them, write them to JSON, and stop (the decoder is the same in mobile_sam and vit_*)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# The adapter (needs only torch and segment_anything: copy it from here to the end of inject)
# 1. CDEN: the boundary-detail CNN
# ----------------------------------------------------------------------------------------------------

def norm_act(channels):
    # GroupNorm, not BatchNorm: the same in training and evaluation, independent of the batch (2 to 8 here)
    return [nn.GroupNorm(8, channels), nn.GELU()]


def ds_block(c_in, c_out, stride):
    """Depthwise-separable conv: DW3x3 -> GN -> GELU -> PW1x1 -> GN -> GELU (no conv bias: GN follows)."""
    return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), *norm_act(c_in),
                         nn.Conv2d(c_in, c_out, 1, bias=False), *norm_act(c_out))


class CDEN(nn.Module):
    """Image (B, 3, S, S) -> two additions: (B, D, S/16, S/16) to the image embedding, (B, D/8, S/4, S/4) to
    the decoder's upscaled features. Both are exactly zero at initialisation (zero 1x1 projections)."""

    def __init__(self, width, dim):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w // 2, 3, 2, 1, bias=False), *norm_act(w // 2))  # 1/2
        self.stage4 = nn.Sequential(ds_block(w // 2, w, 2), ds_block(w, w, 1))  # 1/4
        self.stage8 = nn.Sequential(ds_block(w, 2 * w, 2), ds_block(2 * w, 2 * w, 1))  # 1/8
        self.stage16 = nn.Sequential(ds_block(2 * w, 4 * w, 2), ds_block(4 * w, 4 * w, 1))  # 1/16
        self.fuse = nn.Sequential(nn.Conv2d(7 * w, w, 1, bias=False), *norm_act(w))
        self.to_embedding = nn.Conv2d(w, dim, 1)  # join (i): into the image embedding
        self.to_mask = nn.Conv2d(w, dim // 8, 1)  # join (ii): into the upscaled mask features
        for proj in (self.to_embedding, self.to_mask):
            nn.init.zeros_(proj.weight)  # zero: CDEN adds nothing at step 0 (its body still gets gradients
            nn.init.zeros_(proj.bias)  # from step 1, once the projections have moved off zero)

    def forward(self, x):
        f4 = self.stage4(self.stem(x))  # (B, w, S/4, S/4)
        f8 = self.stage8(f4)  # (B, 2w, S/8, S/8)
        f16 = self.stage16(f8)  # (B, 4w, S/16, S/16)
        size = f4.shape[-2:]
        fused = self.fuse(torch.cat([f4, F.interpolate(f8, size, mode="bilinear", align_corners=False),
                                     F.interpolate(f16, size, mode="bilinear", align_corners=False)], 1))
        return self.to_embedding(F.avg_pool2d(fused, 4)), self.to_mask(fused)  # (B,D,S/16,S/16), (B,D/8,S/4,S/4)


# ----------------------------------------------------------------------------------------------------
# 2. LoRA in the ViT blocks: q/v of the attention (as lora.py) and both MLP linears
# ----------------------------------------------------------------------------------------------------

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


class LoRAQKV(nn.Linear):
    """As lora.py: frozen qkv plus trainable low-rank updates of q and v. `heads=None`: output [q | k | v]
    (SAM's ViT); `heads=h`: per head [q_1 k_1 v_1 | q_2 k_2 v_2 | ...] (MobileSAM's TinyViT)."""

    def __init__(self, qkv: nn.Linear, rank: int, heads=None):
        super().__init__(qkv.in_features, qkv.out_features, bias=qkv.bias is not None, device="meta")
        self.weight, self.bias = qkv.weight, qkv.bias  # the frozen pretrained projection, shared not copied
        self.heads = heads
        d_in, width = qkv.in_features, qkv.out_features // 3
        dev = qkv.weight.device
        self.lora_A_q = nn.Linear(d_in, rank, bias=False, device=dev)
        self.lora_B_q = nn.Linear(rank, width, bias=False, device=dev)
        self.lora_A_v = nn.Linear(d_in, rank, bias=False, device=dev)
        self.lora_B_v = nn.Linear(rank, width, bias=False, device=dev)
        for a, b in ((self.lora_A_q, self.lora_B_q), (self.lora_A_v, self.lora_B_v)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def forward(self, x):
        # x: (B, H, W, d) for ViT (windowed: (B*nW, 14, 14, d)); (B*nW, ws*ws, d) for TinyViT
        dq, dv = self.lora_B_q(self.lora_A_q(x)), self.lora_B_v(self.lora_A_v(x))
        return F.linear(x, self.weight, self.bias) + qv_update(dq, dv, self.heads)  # W x + b + [dq | 0 | dv]


class LoRALinear(nn.Linear):
    """A frozen linear plus B A x (A: in -> r Kaiming, B: r -> out zero), for the MLP's two linears.
    Keeps `weight`/`bias` under their names, so `image_encoder.blocks.3.mlp.lin1.weight` still loads."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        dev = linear.weight.device
        self.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=dev)
        self.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x))


# ----------------------------------------------------------------------------------------------------
# 3. Low-rank attention between the tokens and the image in the mask decoder
# ----------------------------------------------------------------------------------------------------

def pool_tokens(x, size, rank):
    """Image tokens (B, h*w, C) -> (B, r_h*r_w, C), r = min(rank, side) per axis (r divides the side): the
    (h, w) grid of tokens averaged over equal cells. As one matrix over the tokens this is E = P_h (x) P_w
    (P: r x side, row i the mean over cell i), of rank r_h*r_w. A mean keeps nothing for the backward pass."""
    h, w = size
    r_h, r_w = min(rank, h), min(rank, w)
    if (r_h, r_w) == (h, w):
        return x  # full rank: nothing pooled
    cells = x.unflatten(1, (r_h, h // r_h, r_w, w // r_w))  # (B, r_h, cell rows, r_w, cell columns, C)
    return cells.mean((2, 4)).flatten(1, 2)


def image_to_token(attn, q, k, v):
    """SAM's image -> token attention, attn(q, k, v) with q (B, N, C) the N image tokens (+ pe) and k, v
    (B, T, C) the T tokens (+ pe, and without), in its low-rank form. Per head h (d = C'/H wide), with the
    tokens' keys k_ht and values v_ht:
        logits[n, h, t] = (W_q,h q_n + b_q,h) . k_ht / sqrt(d) = q_n . g_ht + c_ht
        out_n = W_o [sum_t P[n, h, t] v_ht]_h + b_o          = sum_(h,t) P[n, h, t] m_ht
    with g_ht = W_q,h^T k_ht / sqrt(d), c_ht = b_q,h . k_ht / sqrt(d), P = softmax over each head's T tokens,
    and m_ht = W_o,h v_ht + b_o / H (each head's P sums to 1 over t, so the H shares give b_o back). The
    output is P (N x H*T) times M (H*T x C), of rank at most H*T; the (N x C') queries and per-head outputs of
    the stock form never exist. The same numbers as stock up to rounding."""
    H = attn.num_heads
    d = attn.internal_dim // H
    k = attn.k_proj(k).unflatten(-1, (H, d)) / math.sqrt(d)  # (B, T, H, d), with softmax's scale
    v = attn.v_proj(v).unflatten(-1, (H, d))  # (B, T, H, d)
    g = torch.einsum("bthd,hdc->bcht", k, attn.q_proj.weight.unflatten(0, (H, d))).flatten(2)  # (B, C, H*T)
    c = torch.einsum("bthd,hd->bht", k, attn.q_proj.bias.unflatten(0, (H, d))).flatten(1)  # (B, H*T)
    p = (q @ g + c[:, None]).unflatten(-1, (H, -1)).softmax(-1).flatten(2)  # (B, N, H*T): softmax per head
    m = torch.einsum("bthd,chd->bhtc", v, attn.out_proj.weight.unflatten(1, (H, d))).flatten(1, 2)  # (B, H*T, C)
    return p @ (m + attn.out_proj.bias / H)  # (B, N, C)


def check_decoder_rank(rank, grid):
    """The rank must cut the (h, w) grid of image tokens into equal cells (or be 0: no low-rank attention)."""
    if rank < 0:
        raise ValueError(f"--decoder-rank {rank} is negative; give a grid side such as 32, or 0 for SAM's decoder "
                         f"attention.")
    for side in grid:
        if 0 < rank < side and side % rank:
            divisor = max(r for r in range(1, rank) if side % r == 0)
            raise ValueError(f"--decoder-rank {rank} does not cut the decoder's {side}-token side into equal cells; "
                             f"use a divisor of {side} such as {divisor}, or {side} or more to pool nothing.")


class LowRankTwoWayTransformer(nn.Module):
    """SAM's TwoWayTransformer with its attentions between the tokens and the image in low-rank form. It holds
    the stock transformer's own blocks, attentions and norms (the same weights, the same state-dict keys) and
    runs them as stock TwoWayTransformer and TwoWayAttentionBlock do, except that each token -> image
    attention reads the image tokens pooled to r x r (pool_tokens; the positional encoding is pooled once,
    at batch 1, and added to the pooled tokens) and each image -> token attention runs as image_to_token."""

    def __init__(self, transformer, rank):
        super().__init__()
        self.layers = transformer.layers  # TwoWayAttentionBlocks: their modules run below, not their forward
        self.final_attn_token_to_image = transformer.final_attn_token_to_image
        self.norm_final_attn = transformer.norm_final_attn
        self.rank = rank

    def token_to_image(self, attn, q, keys, pooled_pe, size):
        x = pool_tokens(keys, size, self.rank)  # (B, r*r, C)
        return attn(q=q, k=x + pooled_pe, v=x)  # SAM's attention, softmax(q k^T / sqrt(d)) v, over r*r keys

    def forward(self, image_embedding, image_pe, point_embedding):
        size = image_embedding.shape[-2:]
        keys = image_embedding.flatten(2).transpose(1, 2)  # (B, N, C): the N = h*w image tokens
        key_pe = image_pe.flatten(2).transpose(1, 2)  # (1, N, C)
        pooled_pe = pool_tokens(key_pe, size, self.rank)  # (1, r*r, C): pooled once, at batch 1
        queries = query_pe = point_embedding  # (1, T, C): the T tokens (prompt-free: the IoU and mask tokens)
        for blk in self.layers:
            if blk.skip_first_layer_pe:
                queries = blk.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + blk.self_attn(q=q, k=q, v=queries)
            queries = blk.norm1(queries)
            queries = blk.norm2(queries + self.token_to_image(blk.cross_attn_token_to_image, queries + query_pe,
                                                              keys, pooled_pe, size))
            queries = blk.norm3(queries + blk.mlp(queries))
            keys = blk.norm4(keys + image_to_token(blk.cross_attn_image_to_token, q=keys + key_pe,
                                                   k=queries + query_pe, v=queries))
        queries = self.norm_final_attn(queries + self.token_to_image(self.final_attn_token_to_image,
                                                                     queries + query_pe, keys, pooled_pe, size))
        return queries, keys  # (B, T, C), (B, N, C)


# ----------------------------------------------------------------------------------------------------
# Where CDEN joins SAM: two forward hooks, so that SAM's modules and state-dict keys stay as they are
# ----------------------------------------------------------------------------------------------------

def add_detail_to_embedding(sam, image_encoder, inputs, embedding):
    """Forward hook on the image encoder: CDEN reads the same normalised image (B, 3, S, S) and adds its
    1/16 map to the embedding (B, D, S/16, S/16); its 1/4 map waits for the mask decoder."""
    to_embedding, sam.cden.to_mask_features = sam.cden(inputs[0])
    return embedding + to_embedding


def add_detail_to_mask_features(sam, upscaling, inputs, upscaled):
    """Forward hook on the decoder's output upscaling: CDEN's 1/4 map (B, D/8, S/4, S/4) joins the upscaled
    features right before the hypernetwork product forms the masks."""
    return upscaled + sam.cden.to_mask_features


def encoder_mlps(image_encoder):
    """(mlp, first linear's name, second linear's name) for every encoder block."""
    if hasattr(image_encoder, "blocks"):  # SAM's ViT: MLPBlock(lin1, act, lin2)
        return [(blk.mlp, "lin1", "lin2") for blk in image_encoder.blocks]
    # TinyViT: stage 0 is convolutional; Mlp(norm, fc1, act, fc2) in the attention stages
    return [(blk.mlp, "fc1", "fc2") for layer in image_encoder.layers[1:] for blk in layer.blocks]


def inject(sam, rank=4, decoder_rank=32, cden_width=32):
    """LoRA in the encoder blocks, CDEN, the decoder's low-rank attention; train those and the mask decoder."""
    import functools
    if cden_width < 16 or cden_width % 16:
        raise ValueError(f"--cden-width {cden_width} must be a positive multiple of 16 (GroupNorm uses 8 "
                         f"groups at half that width); use e.g. 32.")
    check_decoder_rank(decoder_rank, sam.prompt_encoder.image_embedding_size)
    for attn, heads in encoder_attentions(sam.image_encoder):
        limit = min(attn.qkv.in_features, attn.qkv.out_features // 3)
        if not 0 < rank <= limit:
            raise ValueError(f"--rank {rank} does not fit: it must be between 1 and {limit} for this model.")
        attn.qkv = LoRAQKV(attn.qkv, rank, heads)
    for mlp, *names in encoder_mlps(sam.image_encoder):
        for name in names:
            setattr(mlp, name, LoRALinear(getattr(mlp, name), rank))
    if decoder_rank > 0:
        sam.mask_decoder.transformer = LowRankTwoWayTransformer(sam.mask_decoder.transformer, decoder_rank)
    sam.cden = CDEN(cden_width, sam.mask_decoder.transformer_dim).to(sam.mask_decoder.iou_token.weight.device)
    sam.image_encoder.register_forward_hook(functools.partial(add_detail_to_embedding, sam))
    sam.mask_decoder.output_upscaling.register_forward_hook(functools.partial(add_detail_to_mask_features, sam))
    for name, p in sam.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith("cden.")
    sam.mask_decoder.requires_grad_(True)  # as lora.py (SAMed)
    sam.prompt_encoder.no_mask_embed.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# Using it
# ----------------------------------------------------------------------------------------------------

def trainable_by_part(model):
    """Trainable parameters of each component, for metrics.json."""
    parts = dict(encoder_lora=0, cden=0, decoder=0, prompt_encoder=0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = ("encoder_lora" if "lora_" in name else "cden" if name.startswith("cden.") else
                    "decoder" if name.startswith("mask_decoder.") else "prompt_encoder")
            parts[part] += p.numel()
    return parts


# ----------------------------------------------------------------------------------------------------
# Measuring the decoder alone: stock against the low-rank attention (--measure-decoder)
# ----------------------------------------------------------------------------------------------------

def decoders_to_measure(model, rank):
    """{label: mask decoder}: a copy of the model's stock decoder and one with the low-rank attention as inject
    builds it, every parameter trainable (BALR-SAM trains the whole decoder). No CDEN: the decoder alone."""
    stock = copy.deepcopy(model.mask_decoder).requires_grad_(True)
    low = copy.deepcopy(stock)
    low.transformer = LowRankTwoWayTransformer(low.transformer, rank)
    return {"stock": stock, f"balr_sam r={rank}": low}


def decoder_inputs(model, batch_size, device, seed=0):
    """What the decoder reads prompt-free: image embeddings (B, C, S/16, S/16), random (time and memory do not
    depend on their values), the dense positional encoding and the prompt encoder's no-prompt embeddings."""
    grid = model.img_size // 16
    g = torch.Generator(device=device).manual_seed(seed)
    emb = torch.randn(batch_size, model.mask_decoder.transformer_dim, grid, grid, device=device, generator=g)
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=None)
        return emb, model.prompt_encoder.get_dense_pe(), sparse, dense


def run_decoder(decoder, inputs, train, device, part="decoder"):
    """One call under the device's autocast (bf16 on CUDA) of the whole decoder (part "decoder":
    predict_masks) or of its two-way transformer alone ("transformer", on the inputs predict_masks gives it):
    inference without gradients, or a training step's forward and backward of a stand-in loss (the outputs'
    mean square). Returns the outputs."""
    emb, image_pe, sparse, dense = inputs
    with torch.set_grad_enabled(train), common.autocast(device):
        if part == "decoder":
            outputs = decoder.predict_masks(emb, image_pe, sparse, dense)[:1]  # masks (B, tokens - 1, S/4, S/4)
        else:  # as predict_masks calls it prompt-free: tokens (1, T, C), image (B, C, h, w), pe (1, C, h, w)
            tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight, sparse[0]])[None]
            outputs = decoder.transformer(emb + dense, image_pe, tokens)  # (B, T, C), (B, h*w, C)
    if train:
        sum(out.float().square().mean() for out in outputs).backward()
    return outputs


def measure_decoder(model, rank, batch_size, repeats=20, warmup=3):
    """On CUDA, each decoder of decoders_to_measure, eager, whole and its transformer alone: the milliseconds
    of an inference call and of a training step (CUDA events around each call after `warmup` calls; the
    median of `repeats`), and the peak memory one call allocates beyond what was allocated before it (the
    weights and inputs; for training it includes the gradients the call allocates):
    torch.cuda.max_memory_allocated after reset_peak_memory_stats."""
    device = torch.device("cuda")
    inputs = decoder_inputs(model, batch_size, device)
    results = {}
    for label, decoder in decoders_to_measure(model, rank).items():
        decoder.to(device)
        results[label] = dict(parameters=sum(p.numel() for p in decoder.parameters()))
        for part in ("decoder", "transformer"):
            row = results[label][part] = {}
            for mode, train in (("inference", False), ("training", True)):
                decoder.train(train)

                def call():
                    decoder.zero_grad(set_to_none=True)
                    run_decoder(decoder, inputs, train, device, part)
                for _ in range(warmup):  # cuBLAS handles and workspaces, the allocator's first blocks
                    call()
                decoder.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                call()
                torch.cuda.synchronize()
                row[f"{mode}_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
                times = []
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    call()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                row[f"{mode}_ms"] = statistics.median(times)  # the median: robust to a busy machine
        decoder.zero_grad(set_to_none=True)
        decoder.cpu()
        torch.cuda.empty_cache()
    grid = model.img_size // 16
    return dict(model=model.name, img_size=model.img_size, image_tokens=grid ** 2, batch_size=batch_size,
                decoder_rank=rank, pooled_tokens=min(rank, grid) ** 2, autocast="bf16", eager=True, repeats=repeats,
                warmup=warmup, versions=cli.versions(), results=results)


def measure_main(args):
    """--measure-decoder: measure, print a table, write the JSON."""
    if args.device == "cpu" or not torch.cuda.is_available():
        raise UserError("--measure-decoder measures CUDA time and memory and needs a CUDA GPU, which PyTorch does "
                        "not see here (or --device cpu was given).")
    if args.decoder_rank <= 0:
        raise UserError(f"--measure-decoder compares the stock decoder with the low-rank one: --decoder-rank "
                        f"{args.decoder_rank} must be at least 1, e.g. 32.")
    device = cli.setup(args, "balr_sam", gpu_steps=1000)
    try:
        check_decoder_rank(args.decoder_rank, (args.img_size // 16,) * 2)
    except ValueError as e:
        raise UserError(str(e))
    bench = measure_decoder(common.load_sam(args, device), args.decoder_rank, args.batch_size)
    print(f"{args.model} at {args.img_size} ({bench['image_tokens']} image tokens, r = {args.decoder_rank}: "
          f"{bench['pooled_tokens']} pooled), batch {args.batch_size}, bf16 autocast, eager, "
          f"{bench['versions'].get('gpu', 'CUDA')}; in brackets the change against stock:")
    columns = ("inference_ms", "training_ms", "inference_peak_mib", "training_peak_mib")
    print(f"{'':32s}" + "".join(f"{c.replace('_', ' ').replace('mib', 'MiB'):>22s}" for c in columns))
    for label, result in bench["results"].items():
        for part in ("decoder", "transformer"):
            stock = bench["results"]["stock"][part]
            cells = [f"{result[part][c]:.2f}" + ("" if label == "stock" else
                                                 f" ({100 * (result[part][c] / stock[c] - 1):+.0f}%)")
                     for c in columns]
            print(f"{label + ', ' + part:32s}" + "".join(f"{c:>22s}" for c in cells))
    try:
        common.atomic_write(args.measure_decoder, lambda f: f.write(json.dumps(bench, indent=1).encode()))
    except OSError as e:
        raise UserError(f"cannot write --measure-decoder {args.measure_decoder} ({e.strerror}); give a path you can "
                        f"write to.")
    print(f"wrote {args.measure_decoder}")
    return bench


def main(argv=None):
    args = parse_args(argv)
    if args.measure_decoder:
        return measure_main(args)
    # CDEN runs at inference: no merged export
    return cli.main(args, "balr_sam", inject=lambda model: inject(model, args.rank, args.decoder_rank,
                                                                    args.cden_width),
                    describe=lambda model: dict(trainable_by_part=trainable_by_part(model)))


if __name__ == "__main__":
    cli.main_guard(main)

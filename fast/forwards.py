"""Swapped forwards: the same modules, the same parameters and state-dict keys, faster kernels.

Every function named like a module's forward replaces that forward on the module's class (swap_class), so
`image_encoder.blocks.3.attn.qkv.weight` stays where a checkpoint expects it. Each one is exact up to
rounding and tested against stock segment_anything / mobile_sam (tests/test_fast.py). `use_fast_forwards`
applies them all to a built model, adapters included.
"""
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

_SUBCLASSES = {}


def swap_class(module, name, **members):
    """Give `module` a subclass of its class that overrides `members` (one subclass per class, cached).
    Parameters, buffers and state-dict keys stay as they were."""
    cls = type(module)
    if (cls, name) not in _SUBCLASSES:
        _SUBCLASSES[cls, name] = type(name, (cls,), dict(members, __module__=__name__))
    module.__class__ = _SUBCLASSES[cls, name]


def vit_attentions(image_encoder):
    """(attention, heads) of every encoder attention: heads None for SAM's ViT (qkv output [q | k | v] over
    (B, H, W, C) tokens), the head count for TinyViT (qkv output per head [q_h | k_h | v_h])."""
    if hasattr(image_encoder, "blocks"):
        return [(blk.attn, None) for blk in image_encoder.blocks]
    return [(blk.attn, blk.attn.num_heads) for layer in image_encoder.layers[1:] for blk in layer.blocks]


# ----------------------------------------------------------------------------------------------------
# The Triton kernels of relpos_attention.py, where they run
# ----------------------------------------------------------------------------------------------------

TRITON_CAPABILITY = (8, 0)  # Triton's bf16 code needs sm_80 (Ampere) or newer
_RELPOS = None


def relpos_kernels():
    """The module relpos_attention on a CUDA GPU that Triton supports, or on the CPU under Triton's
    interpreter (TRITON_INTERPRET=1, as the tests do); else None. Imported on first use."""
    global _RELPOS
    if _RELPOS is None and (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
                            and torch.cuda.get_device_capability() >= TRITON_CAPABILITY):
        try:
            from fast import relpos_attention
            _RELPOS = relpos_attention
        except ImportError:  # a PyTorch without Triton
            pass
    return _RELPOS


# ----------------------------------------------------------------------------------------------------
# SAM's ViT: attention with the decomposed relative-position term
# ----------------------------------------------------------------------------------------------------

def rel_pos_sized(rel_pos, size):
    """A rel-pos table (2*size-1, C) for a grid `size` wide, resized (linear) as stock's get_rel_pos does."""
    if rel_pos.shape[0] != 2 * size - 1:
        rel_pos = F.interpolate(rel_pos.T[None], 2 * size - 1, mode="linear")[0].T
    return rel_pos


def rel_pos_table(rel_pos, size):
    """SAM's get_rel_pos for equal query and key sizes: (2*size-1, C) -> (size, size, C), entry [a, b] the
    embedding of offset a - b; the index is built on the table's device (stock builds it on the CPU)."""
    rel_pos = rel_pos_sized(rel_pos, size)
    pos = torch.arange(size, device=rel_pos.device)
    return rel_pos[pos[:, None] - pos[None, :] + size - 1]


def key_position_code(H, W, pad, device, dtype):
    """(H*W, H + W + pad): key j = (row r, col c) -> [onehot(r) | onehot(c) | 0...]."""
    token = torch.arange(H * W, device=device)[:, None]
    rows = token // W == torch.arange(H, device=device)  # (N, H) one-hot, by comparison: no host sync
    cols = token % W == torch.arange(W, device=device)  # (N, W)
    return F.pad(torch.cat([rows, cols], 1).to(dtype), (0, pad))


def vit_attention(self, x):
    """forward of SAM ViT's Attention: exact attention with the decomposed rel-pos term and no N x N matrix
    in memory. x: (B, H, W, C); windowed blocks pass (B*nW, 14, 14, C), global ones (B, S/16, S/16, C).

    On CUDA the Triton kernels of relpos_attention.py take the qkv output and the two tables as they are.
    Elsewhere the term is folded into scaled_dot_product_attention: stock adds
        bias(i, j) = q_i . Rh[row i, row j] + q_i . Rw[col i, col j] = [rel_h_i | rel_w_i] . [onehot(row j) | onehot(col j)],
    so q' = [q * scale | rel_h | rel_w] and k' = [k | onehot(row) | onehot(col)] give q'_i . k'_j = scale q_i . k_j
    + bias(i, j), the stock logits, with SDPA's scale 1. Head widths grow to 64 + 14 + 14 (windowed ViT-B)
    or 64 + 64 + 64 (global at 1024), padded with zeros to a multiple of 8; v is padded to the same width
    when self.fast_pad_v (some SDPA kernels take equal widths only) and the output sliced back.
    One global ViT-B block at 1024, batch 8, forward + backward on an H100: 12.0 ms folded, 7.2 ms in the
    Triton kernels, 3.2 ms for the same attention without the term."""
    B, H, W, _ = x.shape
    N, heads = H * W, self.num_heads
    qkv = self.qkv(x).reshape(B, N, 3, heads, -1)  # (B, N, 3, heads, hd); self.qkv may be an adapter
    hd = qkv.shape[-1]
    if self.use_rel_pos and self.fast_relpos and _RELPOS.usable(qkv, H, W):
        out = _RELPOS.relpos_attention(qkv, rel_pos_sized(self.rel_pos_h, H), rel_pos_sized(self.rel_pos_w, W),
                                       self.scale)  # (B, N, heads, hd)
        return self.proj(out.reshape(B, H, W, heads * hd))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, hd)
    scale = self.scale
    if self.use_rel_pos:
        Rh, Rw = rel_pos_table(self.rel_pos_h, H), rel_pos_table(self.rel_pos_w, W)  # (H, H, hd), (W, W, hd)
        grid = q.reshape(B, heads, H, W, hd)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, Rh).reshape(B, heads, N, H).to(q.dtype)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, Rw).reshape(B, heads, N, W).to(q.dtype)
        width = hd + H + W
        pad = -width % 8
        q = torch.cat([q * scale, rel_h, rel_w, q.new_zeros(()).expand(B, heads, N, pad)], -1)
        code = key_position_code(H, W, pad, q.device, q.dtype).expand(B, heads, N, H + W + pad)
        k = torch.cat([k, code], -1)  # (B, heads, N, width + pad)
        if self.fast_pad_v:
            v = F.pad(v, (0, width + pad - hd))
        scale = 1.0
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :hd]  # (B, heads, N, hd)
    return self.proj(out.transpose(1, 2).reshape(B, H, W, heads * hd))  # channels head-major, as stock


def vit_block(self, x):
    """forward of SAM ViT's Block: a windowed block whose qkv is tokenwise runs its attention over the whole
    grid through the window kernels (vit_window_attention); anything else is stock Block.forward (whose
    attention is vit_attention). x: (B, H, W, C)."""
    from segment_anything.modeling.image_encoder import Block
    attn = self.attn
    if self.window_size and attn.use_rel_pos and attn.fast_relpos and attn.qkv_tokenwise:
        qkv = attn.qkv(self.norm1(x))  # (B, H, W, 3C)
        B, H, W, _ = x.shape
        qkv = qkv.reshape(B, H * W, 3, attn.num_heads, -1)  # (B, N, 3, heads, hd)
        if _RELPOS.usable_windows(qkv, (self.window_size, self.window_size)):
            x = x + vit_window_attention(attn, qkv, (H, W), self.window_size)
            return x + self.mlp(self.norm2(x))
    return Block.forward(self, x)  # also a dtype the kernels do not take (fp16): qkv computed again


def vit_window_attention(attn, qkv, grid, window):
    """A windowed block's attention over the whole H x W grid without stock SAM's padding; qkv
    (B, H*W, 3, heads, hd); returns the projected output (B, H, W, C).

    Stock pads the grid with zero tokens to whole windows (64 x 64 -> 70 x 70 at 1024: 16.4% padding) and
    runs qkv, attention and proj on every window. The padding's k and v are what qkv gives a zero token:
    its bias, for a tokenwise qkv. So qkv and proj run on the grid's tokens only, and the window kernels
    read each window in place, use the bias's k and v for the padding keys (they take part in the border
    windows' softmax, as in stock), skip the padding queries (stock drops their outputs) and write the
    output in the grid's layout. Graphed ViT-B LoRA step at batch 8, H200: 68.5 ms padded, 67.0 ms not."""
    (H, W), heads = grid, attn.num_heads
    bias = attn.qkv.bias
    pad_kv = None
    if H % window or W % window:  # the padding tokens' k and v: (2, heads, hd)
        pad = bias.to(qkv.dtype) if bias is not None else qkv.new_zeros(qkv.shape[2] * heads * qkv.shape[-1])
        pad_kv = pad.view(3, heads, -1)[1:]
    out = _RELPOS.window_attention(qkv, rel_pos_sized(attn.rel_pos_h, window), rel_pos_sized(attn.rel_pos_w, window),
                                   attn.scale, (H, W), pad_kv)  # (B, N, heads, hd)
    return attn.proj(out.reshape(qkv.shape[0], H, W, -1))


def is_tokenwise(qkv, window):
    """Whether a qkv module maps each token alone and a zero token to its bias, found by trying it: on a copy
    whose trainable parameters are random (most adapters start as the identity, which would pass), a change
    of one token must change no other token's output. nn.Linear, LoRA and SALT are tokenwise; AtrousLoRA's
    convolutions and SAMora's fusion mix a window's tokens and keep stock's padded windows."""
    if type(qkv) is nn.Linear:
        return True
    try:
        probe = copy.deepcopy(qkv).float()
        gen = torch.Generator(device=qkv.weight.device).manual_seed(0)
        with torch.no_grad():
            for p in probe.parameters():
                if p.requires_grad:
                    p.copy_(0.5 * torch.randn(p.shape, device=p.device, generator=gen))
            x = torch.randn(2, window, window, qkv.in_features, device=qkv.weight.device, generator=gen)
            y = probe(x)
            x[0, 0, 0] += 1
            changed = (probe(x) - y).abs().amax(-1) > 1e-5 * y.abs().amax()  # (2, window, window)
            zero = probe(torch.zeros_like(x[:1]))
            bias = probe.bias if probe.bias is not None else torch.zeros(zero.shape[-1], device=zero.device)
        return int(changed.sum()) == 1 and bool(changed[0, 0, 0]) and torch.allclose(zero, bias.expand_as(zero), atol=1e-5)
    except Exception:  # an adapter that takes no such input: stock's windows
        return False


# ----------------------------------------------------------------------------------------------------
# LoRA's q/v update inside the frozen qkv matmul
# ----------------------------------------------------------------------------------------------------

LORA_PARTS = ("lora_A_q", "lora_B_q", "lora_A_v", "lora_B_v")


def place_qv(dq, dv, heads):
    """q and v updates (..., width) laid out as the qkv output keeps them, zeros for k: [q | k | v]
    (heads=None) or per head [q_h | k_h | v_h] (TinyViT, heads=h)."""
    dk = torch.zeros_like(dq)
    if heads is None:
        return torch.cat([dq, dk, dv], -1)
    return torch.stack([t.unflatten(-1, (heads, -1)) for t in (dq, dk, dv)], -2).flatten(-3)  # (..., heads*3*hd)


class _LinearWithUpdate(torch.autograd.Function):
    """[x | z] [W | U^T]^T + b as one matmul of inner size d + 2r, for a weight W (out, d) and an update
    U (2r, out). Its backward forms U's gradient (2r x out) and W's only where W trains, where autograd's
    would form the gradient of the whole widened weight."""

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
    """F.linear(x, weight, bias) + place_qv(z_q B_q^T, z_v B_v^T, heads) for z = [z_q | z_v] (..., 2r).
    The update is one (2r, 3 width) matrix, so its products have inner size 2r: at rank 4, 16 bytes of bf16,
    which cuBLAS's Hopper kernels need (r-wide slices ran in slower align-2 kernels)."""
    zeros = torch.zeros_like(B_q)  # (width, r)
    up = torch.cat([place_qv(B_q.T, zeros.T, heads), place_qv(zeros.T, B_v.T, heads)])  # (2r, 3 width)
    if heads is not None:  # TinyViT: add z U to the output in the matmul's epilogue (addmm)
        out = F.linear(x, weight, bias)
        return torch.addmm(out.flatten(0, -2), z.flatten(0, -2), up).view(out.shape)
    if torch.is_autocast_enabled(x.device.type):  # every operand in the product's dtype, as autocast casts them
        dtype = torch.get_autocast_dtype(x.device.type)
        x, z, weight, up = x.to(dtype), z.to(dtype), weight.to(dtype), up.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _LinearWithUpdate.apply(x, z, weight, bias, up)


def fused_lora_qkv(self, x):
    """forward of a LoRA qkv (W x + b + [B_q A_q x | 0 | B_v A_v x]) as two matmuls: [A_q; A_v] x, then
    linear_with_qv_update. Each saved part of a ViT-B LoRA step at batch 8: 1.8% (H200) and 1.4% (H100)."""
    down = F.linear(x, torch.cat([self.lora_A_q.weight, self.lora_A_v.weight]))  # (..., 2r)
    return linear_with_qv_update(x, self.weight, self.bias, down, self.lora_B_q.weight, self.lora_B_v.weight,
                                 self.fused_heads)


def lora_layout(qkv, heads):
    """(True, layout) when `qkv` is an nn.Linear with exactly the children lora_A_q, lora_B_q, lora_A_v and
    lora_B_v and computes fused_lora_qkv's result in layout None ([q | k | v]) or `heads` (per head), found
    by trying it on a copy with random weights; (False, None) for anything else."""
    children = dict(qkv.named_children())
    if not isinstance(qkv, nn.Linear) or set(children) != set(LORA_PARTS):
        return False, None
    probe = copy.deepcopy(qkv).float()
    gen = torch.Generator(device=qkv.weight.device).manual_seed(0)
    with torch.no_grad():
        for name in LORA_PARTS:
            w = getattr(probe, name).weight
            w.copy_(torch.randn(w.shape, device=w.device, generator=gen))
        x = torch.randn(2, 5, qkv.in_features, device=qkv.weight.device, generator=gen)
        expected = probe(x)
        for layout in (None, heads):
            probe.fused_heads = layout
            if torch.allclose(fused_lora_qkv(probe, x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max()):
                return True, layout
    return False, None


# ----------------------------------------------------------------------------------------------------
# MobileSAM's TinyViT
# ----------------------------------------------------------------------------------------------------

def tinyvit_attention(self, x):
    """forward of TinyViT's Attention through SDPA: its learned bias attention_biases[:, idxs] (heads, N, N),
    N = ws*ws <= 196, goes in as attn_mask (exact); softmax and both products in one kernel. x: (B*nW, ws*ws, C)."""
    B, N, _ = x.shape
    x = self.norm(x)
    q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, d)
    bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(B, N, self.dh))


def tinyvit_block(self, x):
    """forward of TinyViTBlock with its depthwise local conv on a channels-last view of the tokens (stock
    copies (B, L, C) to a contiguous (B, C, H, W) and back; cuDNN's channels-last kernel is faster).
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
    """forward of a frozen nn.LayerNorm under bf16 autocast: bf16 in and out, statistics in fp32 inside the
    kernel. Autocast would run it in fp32 and the next linear layer would copy the output back to bf16;
    only gamma and beta are rounded to bf16. A norm that trains (SALT's) or an fp32 input keeps stock's path.
    Graphed MobileSAM LoRA step at batch 8, H100: 41.2 -> 37.8 ms."""
    if x.dtype == torch.float32 or self.weight is None or self.weight.requires_grad:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def folded_conv_bn(self, x):
    """forward of TinyViT's Conv2d_BN with its frozen eval-mode BatchNorm folded into the convolution
    (w * gamma / sigma, beta - mu * gamma / sigma): one pass instead of two. A 1x1 convolution of a
    channels-last image runs as F.linear over its pixels, whose cuBLAS kernel adds the bias as it writes.
    BatchNorm in training mode: as stock."""
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


def channels_last_patch_embed(self, x):
    """forward of TinyViT's PatchEmbed, its output (B, 64, S/4, S/4) channels-last, so that the first stage's
    convolutions run in cuDNN's NHWC kernels."""
    return self.seq(x).contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------------
# Both encoders and the decoder
# ----------------------------------------------------------------------------------------------------

def layer_norm_2d_one_kernel(self, x):
    """forward of LayerNorm2d (both necks, the decoder's upscaling) as one layer-norm kernel over the
    channels-last view (B, H, W, C) instead of stock's eight elementwise and reduction passes. The output
    is channels-last, which the next convolution takes as it is."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def decoder_attention(self, q, k, v):
    """forward of the mask decoder's Attention (the seven of its two-way transformer) through SDPA, with the
    module's own projections (adapters that replace them still run). q (Bq, Nq, C), k and v (Bk, Nk, C):
    prompt-free, the tokens come at batch 1 beside B images and broadcast, as in stock's matmuls."""
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)  # (B', N, internal_dim)
    batch = max(q.shape[0], k.shape[0], v.shape[0])

    def by_heads(t):  # (B', N, heads * d) -> (batch, heads, N, d), a view
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2).expand(batch, -1, -1, -1)
    out = F.scaled_dot_product_attention(by_heads(q), by_heads(k), by_heads(v))  # scale 1/sqrt(d), as stock
    return self.out_proj(out.transpose(1, 2).flatten(2))  # (batch, Nq, C)


def patch_embed_as_matmul(self, x):
    """forward of SAM ViT's PatchEmbed (a convolution whose kernel is its stride) as one matmul over the
    image's patches: (B, 3, S, S) -> (B, S/p, S/p, 3*p*p) patches times the (C, 3*p*p) weight. cuDNN runs
    that convolution without tensor cores (1.3 ms of a ViT-B step at batch 8 on an H100). Output
    (B, S/p, S/p, C), as stock; any other convolution: as stock."""
    proj = self.proj
    (p, q), (B, C, H, W) = proj.kernel_size, x.shape
    if proj.stride != (p, q) or proj.padding != (0, 0) or H % p or W % q:
        return proj(x).permute(0, 2, 3, 1)
    patches = x.reshape(B, C, H // p, p, W // q, q).permute(0, 2, 4, 1, 3, 5).reshape(B, H // p, W // q, C * p * q)
    return F.linear(patches, proj.weight.flatten(1), proj.bias)  # weight (C_out, C, p, q): the same order


def use_fast_forwards(model, pad_v=True, relpos_kernel=True):
    """Swap every forward above into a built model (adapters injected): the encoder's attentions and
    blocks, its patch embedding or TinyViT's convolutions and norms, every LayerNorm2d, the decoder's
    attentions. relpos_kernel=False: the folded SDPA form in ViT blocks even where the kernels run;
    pad_v=False: v at its own width in the folded form."""
    from segment_anything.modeling.image_encoder import Block, PatchEmbed as VitPatchEmbed
    from segment_anything.modeling.transformer import Attention as DecoderAttention
    encoder = model.image_encoder
    windows = {blk.attn: getattr(blk, "window_size", 0) for blk in getattr(encoder, "blocks", ())}
    for attn, heads in vit_attentions(encoder):
        if getattr(attn, "is_fast", False):
            continue
        fused, layout = lora_layout(attn.qkv, heads)
        if fused:
            swap_class(attn.qkv, "Fused" + type(attn.qkv).__name__, forward=fused_lora_qkv)
            attn.qkv.fused_heads = layout
        if heads is None:  # SAM's ViT
            attn.qkv_tokenwise = is_tokenwise(attn.qkv, windows[attn] or 4)
            swap_class(attn, "FastAttention", forward=vit_attention, is_fast=True)
            attn.fast_pad_v = pad_v
            attn.fast_relpos = relpos_kernel and relpos_kernels() is not None
        else:
            swap_class(attn, "FastTinyViTAttention", forward=tinyvit_attention, is_fast=True)
    for blk in getattr(encoder, "blocks", ()):
        if type(blk) is Block:
            swap_class(blk, "FastBlock", forward=vit_block)
    if type(getattr(encoder, "patch_embed", None)) is VitPatchEmbed:
        swap_class(encoder.patch_embed, "MatmulPatchEmbed", forward=patch_embed_as_matmul)
    if not hasattr(encoder, "blocks"):  # TinyViT
        from mobile_sam.modeling.tiny_vit_sam import Conv2d_BN, PatchEmbed, TinyViTBlock
        for m in encoder.modules():
            if type(m) is nn.LayerNorm:
                swap_class(m, "ComputeDtypeLayerNorm", forward=layer_norm_in_compute_dtype)
            elif type(m) is TinyViTBlock:
                swap_class(m, "FastTinyViTBlock", forward=tinyvit_block)
            elif type(m) is Conv2d_BN:
                swap_class(m, "FoldedConv2d_BN", forward=folded_conv_bn)
            elif type(m) is PatchEmbed:
                swap_class(m, "ChannelsLastPatchEmbed", forward=channels_last_patch_embed)
    for m in model.modules():
        if type(m).__name__ == "LayerNorm2d":
            swap_class(m, "OneKernelLayerNorm2d", forward=layer_norm_2d_one_kernel)
        elif type(m) is DecoderAttention:
            swap_class(m, "FastDecoderAttention", forward=decoder_attention)

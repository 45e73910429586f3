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
  3. In the mask decoder, each of the 7 attentions of the two-way transformer (self_attn, both cross
     attentions of both blocks, final_attn_token_to_image) has its q/k/v projections W (out x in) replaced
     by a factorised U V (U: out x r, V: r x in), initialised by the truncated SVD of the pretrained W
     (U = U_r sqrt(S_r), V = sqrt(S_r) V_r^T; bias kept), r = --decoder-rank. At full rank this is the
     pretrained decoder up to rounding. The factors train with the rest of the decoder (as SAMed trains it).
     At r < full rank the model does NOT start as stock SAM: it starts from the best rank-r approximation
     (at full rank the two factors hold more weights than W; that setting exists for the tests).
Honest note on "75% less memory": a rank-32 factorisation of a 256x256 projection has exactly 75% fewer
parameters (2*256*32 = 256^2 / 4), but only weights shrink: the attention matrices and the activations
(tokens x channels) are the same size, and the extra (tokens x r) intermediate even adds a little activation
memory. With one foreground class the decoder has 3.78 M parameters (15 MB in fp32); its 21 q/k/v projection
weights hold 0.88 M of them, and at r = 32 their factors hold 0.28 M: 0.6 M parameters (2.4 MB) saved, 16% of
the decoder. At 1024 input we expect peak decoder memory to be dominated by activations, which do not
shrink, so a saving of a few MB, not 75%. The projections need fewer FLOPs (2.7x fewer for 256 -> 128), which
may or may not be faster on a GPU, where two small matmuls replace one. `--measure-decoder` measures both.
Trainable parameters (--rank 4, --decoder-rank 32, --cden-width 32; one foreground class). Our own counts;
the paper's "1.8% = 11.7 M" implies SAM ViT-H and is not copied:
  mobile_sam: 3,333,826 of 9,405,322 (35.4%): LoRA 103,936 + CDEN 54,048 + decoder 3,175,586 + no_mask_embed 256
  vit_b:      3,745,986 of 93,422,862 (4.0%): LoRA 516,096, the rest as above
  vit_h:      5,523,650 of 642,555,662 (0.86%): LoRA 2,293,760, the rest as above
(The totals are below stock SAM's because the factorised projections replace 0.6 M dense weights.)

Run:  python balr_sam.py --data drive --data-root path/to/DRIVE --split salt
      python balr_sam.py --measure-decoder          # decoder memory / time, dense vs low-rank
"""
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention

import cli
import common


def parse_args(argv=None):
    p = common.base_parser("BALR-SAM: detail CNN (CDEN) + LoRA in the ViT blocks + low-rank decoder attention, "
                           "prompt-free.")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of the encoder's q/v and MLP updates")
    p.add_argument("--decoder-rank", type=int, default=32,
                   help="rank r of the decoder's factorised q/k/v projections (clipped to each projection's full "
                        "rank; 0 keeps the dense pretrained projections)")
    p.add_argument("--cden-width", type=int, default=32,
                   help="CDEN channels at 1/4 scale (2x at 1/8, 4x at 1/16); a multiple of 16")
    p.add_argument("--measure-decoder", action="store_true",
                   help="measure the mask decoder's time and peak memory with dense and with low-rank attention "
                        "projections, write decoder_benchmark.json into the run folder, and stop")
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
# 3. Low-rank attention projections in the mask decoder
# ----------------------------------------------------------------------------------------------------

class LowRankLinear(nn.Module):
    """y = U (V x) + b in place of a dense W x + b, with U V the rank-r truncated SVD of the pretrained W.
    Keeps the module path (`...self_attn.q_proj`) and `bias`; the dense `weight` is gone (U and V replace it)."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # SVD in float64 so that full rank reproduces W to ~1e-7 in fp32
        u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        self.rank = min(rank, len(s))
        root = s[:self.rank].sqrt()  # split the singular values evenly between the factors
        dtype = linear.weight.dtype
        self.lowrank_U = nn.Parameter((u[:, :self.rank] * root).to(dtype))  # (out, r)
        self.lowrank_V = nn.Parameter((root[:, None] * vh[:self.rank]).to(dtype))  # (r, in)
        self.bias = linear.bias

    def forward(self, x):  # (B, N, in) -> (B, N, r) -> (B, N, out)
        return F.linear(F.linear(x, self.lowrank_V), self.lowrank_U, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def decoder_attentions(mask_decoder):
    """The 7 attentions of SAM's two-way transformer (depth 2): per block self_attn,
    cross_attn_token_to_image, cross_attn_image_to_token; then final_attn_token_to_image."""
    return [m for m in mask_decoder.transformer.modules() if isinstance(m, Attention)]


def factorise_decoder(mask_decoder, rank):
    for attn in decoder_attentions(mask_decoder):
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, LowRankLinear(getattr(attn, name), rank))


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
    """LoRA in the encoder blocks, low-rank decoder attention, CDEN; train those and the mask decoder."""
    import functools
    if cden_width < 16 or cden_width % 16:
        raise ValueError(f"--cden-width {cden_width} must be a positive multiple of 16 (GroupNorm uses 8 "
                         f"groups at half that width); use e.g. 32.")
    if decoder_rank < 0:
        raise ValueError(f"--decoder-rank {decoder_rank} is negative; give a rank, or 0 for dense projections.")
    for attn, heads in encoder_attentions(sam.image_encoder):
        limit = min(attn.qkv.in_features, attn.qkv.out_features // 3)
        if not 0 < rank <= limit:
            raise ValueError(f"--rank {rank} does not fit: it must be between 1 and {limit} for this model.")
        attn.qkv = LoRAQKV(attn.qkv, rank, heads)
    for mlp, *names in encoder_mlps(sam.image_encoder):
        for name in names:
            setattr(mlp, name, LoRALinear(getattr(mlp, name), rank))
    if decoder_rank > 0:
        factorise_decoder(sam.mask_decoder, decoder_rank)
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
    parts = dict(encoder_lora=0, cden=0, decoder=0, decoder_of_which_qkv_factors=0, prompt_encoder=0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = ("encoder_lora" if "lora_" in name else "cden" if name.startswith("cden.") else
                    "decoder" if name.startswith("mask_decoder.") else "prompt_encoder")
            parts[part] += p.numel()
            parts["decoder_of_which_qkv_factors"] += p.numel() if "lowrank_" in name else 0
    return parts


# ----------------------------------------------------------------------------------------------------
# Measuring the decoder: dense vs low-rank attention projections
# ----------------------------------------------------------------------------------------------------

def measure_decoder(model, rank, batch_size, device, repeats):
    """Time and peak memory of MaskDecoder.predict_masks alone, on random image embeddings, for the model's
    dense decoder and a copy with rank-`rank` projections: inference (no grad, eval) and a training step's
    forward + backward (every decoder parameter trained). Peak memory is what the call allocates on top of
    the weights and inputs (CUDA only; None on the CPU). Times are medians over `repeats` calls, each
    synchronised. bf16 autocast on CUDA, fp32 on the CPU, eager (not compiled)."""
    pe = model.prompt_encoder
    dim, grid = model.mask_decoder.transformer_dim, model.img_size // 16
    emb = torch.randn(batch_size, dim, grid, grid, device=device)
    with torch.no_grad():
        sparse, dense = pe(points=None, boxes=None, masks=None)
        image_pe = pe.get_dense_pe()
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        fn(), fn()  # warm-up (cuBLAS handles, autotuning)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
        return sorted(times)[len(times) // 2] * 1000, peak  # median: robust to a busy machine

    results = {}
    for label, r in (("dense", 0), (f"low-rank r={rank}", rank)):
        dec = copy.deepcopy(model.mask_decoder).to(device)
        if r > 0:
            factorise_decoder(dec, r)
        qkv = sum(p.numel() for a in decoder_attentions(dec) for n in ("q_proj", "k_proj", "v_proj")
                  for p in getattr(a, n).parameters())
        dec.requires_grad_(True)

        def forward():
            with common.autocast(device):
                return dec.predict_masks(emb, image_pe, sparse, dense)[0]

        def infer():
            with torch.no_grad():
                forward()

        def train_step():
            forward().float().square().mean().backward()
            dec.zero_grad(set_to_none=True)

        dec.eval()
        infer_ms, infer_mb = timed(infer)
        dec.train()
        train_ms, train_mb = timed(train_step)
        results[label] = dict(decoder_params=sum(p.numel() for p in dec.parameters()), qkv_params=qkv,
                              infer_ms=infer_ms, infer_peak_mib=infer_mb, train_ms=train_ms, train_peak_mib=train_mb)
        del dec
    return dict(model=model.name, img_size=model.img_size, batch_size=batch_size, device=str(device),
                repeats=repeats, results=results)


def main(argv=None):
    args = parse_args(argv)
    if args.measure_decoder:
        device = common.setup(args, "balr_sam", gpu_steps=1000)
        model = common.load_sam(args, device)
        bench = measure_decoder(model, args.decoder_rank or 32, args.batch_size, device,
                                repeats=20 if device.type == "cuda" else 5)
        for label, r in bench["results"].items():
            mib = lambda v: "n/a (CPU)" if v is None else f"{v:.1f} MiB"
            print(f"{label:16s} decoder {r['decoder_params']:,} params (q/k/v {r['qkv_params']:,})  "
                  f"inference {r['infer_ms']:.2f} ms, peak {mib(r['infer_peak_mib'])}  "
                  f"train fwd+bwd {r['train_ms']:.2f} ms, peak {mib(r['train_peak_mib'])}")
        run_dir = Path(args.out) / args.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "decoder_benchmark.json").write_text(json.dumps(bench, indent=1))
        return bench
    # CDEN runs at inference: no merged export
    return cli.main(args, "balr_sam", inject=lambda model: inject(model, args.rank, args.decoder_rank,
                                                                     args.cden_width),
                       describe=lambda model: dict(trainable_by_part=trainable_by_part(model)))


if __name__ == "__main__":
    cli.main_guard(main)

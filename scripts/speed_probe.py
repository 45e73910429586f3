"""Probe for the speed issue (#7): which attention kernel, where a step's time goes, what whole-step CUDA
graphs give. Sections: attn (kernels alone, global and windowed ViT-B shapes: results/h100/
speed_probe_attention_and_mobile_sam_step.json), relpos (relpos_attention.py's kernels: launch settings,
time beside the folded form: results/h100/speed_probe_relpos.json), msam (MobileSAM LoRA step, graphed, with TinyViT layout
variants applied one after another: results/h100/speed_probe_tinyvit_layout.json), vitb (ViT-B LoRA step:
compile time, recompiles, kernel profile: results/h100/speed_probe_vit_b_profile.json), msam2 (MobileSAM LoRA
step as common.run trains it, TinyViT's LayerNorms as stock runs them under autocast and in bf16:
results/h100/speed_probe_mobile_sam_layer_norm.json), regions (ViT-B LoRA step: GPU time by part of the
model, the residual stream in bf16: results/h200/speed_probe_regions_dk.json).
    python scripts/speed_probe.py attn msam vitb --out runs/probe
The msam variants are the prototypes of what common.use_fast_attention now does itself (bnfold, cl_block,
cl_stage1; bias4d was dropped), so with today's code its "default" row already includes them. The vitb
section reports PEFT_SAM_GLOBAL_ATTENTION, a switch of the code of the time (FlexAttention variants for the
global blocks, measured and dropped; see common.fast_vit_attention).
"""
import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

RESULTS = {}


def time_ms(fn, reps=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


# ---------------------------------------------------------------------------------------------------- attn

def relpos_inputs(B, heads, H, W, hd, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, heads, H * W, hd, device="cuda", dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    Rh = (torch.randn(2 * H - 1, hd, device="cuda", generator=g) * 0.5).requires_grad_()
    Rw = (torch.randn(2 * W - 1, hd, device="cuda", generator=g) * 0.5).requires_grad_()
    return q, k, v, Rh, Rw


def stock_ref(q, k, v, Rh, Rw, H, W, scale):
    """SAM's add_decomposed_rel_pos with explicit logits (fp32 reference)."""
    B, heads, N, hd = q.shape
    rh, rw = common._rel_pos_table(Rh, H), common._rel_pos_table(Rw, W)
    grid = q.reshape(B, heads, H, W, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, rw)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.view(B, heads, H, W, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
    return attn.view(B, heads, N, N).softmax(-1) @ v


def rel_terms(q, Rh, Rw, H, W):
    B, heads, N, hd = q.shape
    grid = q.reshape(B, heads, H, W, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, common._rel_pos_table(Rh.to(q.dtype), H)).reshape(B, heads, N, H)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, common._rel_pos_table(Rw.to(q.dtype), W)).reshape(B, heads, N, W)
    return rel_h.to(q.dtype), rel_w.to(q.dtype)


def folded(q, k, v, Rh, Rw, H, W, scale, pad_v=True, mult=8):
    B, heads, N, hd = q.shape
    rel_h, rel_w = rel_terms(q, Rh, Rw, H, W)
    width = hd + H + W
    pad = -width % mult
    q2 = torch.cat([q * scale, rel_h, rel_w, q.new_zeros(()).expand(B, heads, N, pad)], -1)
    k2 = torch.cat([k, common._key_position_code(H, W, pad, q.device, q.dtype).expand(B, heads, N, H + W + pad)], -1)
    return q2, k2, (F.pad(v, (0, width + pad - hd)) if pad_v else v)


_FLEX = None
# A copy of relpos_attention.py as an earlier commit had it, its op renamed (peft_sam_head::...), made before a
# call with: git show HEAD:relpos_attention.py | sed 's/peft_sam::/peft_sam_head::/' > .data/relpos_attention_head.py
HEAD_KERNELS = Path(__file__).resolve().parents[1] / ".data" / "relpos_attention_head.py"


@functools.cache
def head_kernels():
    import importlib.util
    spec = importlib.util.spec_from_file_location("relpos_attention_head", HEAD_KERNELS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dynamo imports the module of a custom op it traces by name
    spec.loader.exec_module(module)
    return module


def flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def variant(name, H, W, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = dict(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                    eff=SDPBackend.EFFICIENT_ATTENTION)

    def run(q, k, v, Rh, Rw):
        hd = q.shape[-1]
        if name.startswith("sdpa_"):  # sdpa_<backend>_<padv|nopadv>
            _, backend, padv = name.split("_")
            q2, k2, v2 = folded(q, k, v, Rh, Rw, H, W, scale, pad_v=padv == "padv")
            with sdpa_kernel(backends[backend]):
                return F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)[..., :hd]
        if name == "flex_folded":
            q2, k2, v2 = folded(q, k, v, Rh, Rw, H, W, scale, pad_v=False, mult=16)
            return flex()(q2, k2, v2, scale=1.0)
        if name == "flex_bias":
            rel_h, rel_w = rel_terms(q, Rh, Rw, H, W)

            def score_mod(score, b, h, qi, kj):
                return score + rel_h[b, h, qi, kj // W] + rel_w[b, h, qi, kj % W]
            return flex()(q, k, v, score_mod=score_mod, scale=scale)
        if name in ("triton", "triton_head"):  # relpos_attention.py as common.fast_vit_attention calls it (the
            # tables), or an earlier commit's copy (HEAD_KERNELS; calls ap-ay took q, k, v, rel_h and rel_w instead)
            qkv = torch.stack([q, k, v], 2).transpose(1, 3)  # (B, N, 3, heads, hd); a copy the model does not make
            kernels = head_kernels() if name == "triton_head" else __import__("relpos_attention")
            return kernels.relpos_attention(qkv, Rh, Rw, scale).transpose(1, 2)
        if name.startswith("nobias_"):  # lower bound: no rel-pos term at all
            with sdpa_kernel(backends[name.split("_")[1]]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        raise ValueError(name)
    return run


def time_variant(name, fn, inputs, grad_out):
    """One attention variant: its first forward + backward (s), then forward + backward and forward alone
    (ms), and the peak memory of the timed calls. The nobias_* variants take no rel-pos tables."""
    wrt = inputs if not name.startswith("nobias") else inputs[:3]

    def step():
        torch.autograd.grad(fn(*inputs), wrt, grad_out)

    def fwd():
        with torch.no_grad():
            fn(*inputs)
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    return dict(train_ms=time_ms(step), fwd_ms=time_ms(fwd), first_s=first,
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


def probe_attn():
    out = {}
    names = ["sdpa_flash_padv", "sdpa_cudnn_padv", "sdpa_eff_nopadv", "sdpa_cudnn_nopadv", "flex_folded",
             "flex_bias", "nobias_flash", "nobias_cudnn"]
    # exactness, fp32, small grid
    H = W = 16
    q, k, v, Rh, Rw = relpos_inputs(2, 3, H, W, 64, torch.float32)
    scale = 64 ** -0.5
    g = torch.randn(2, 3, H * W, 64, device="cuda")
    ref = stock_ref(q, k, v, Rh, Rw, H, W, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v, Rh, Rw), g)
    for name in names:
        if name.startswith("nobias"):
            continue
        try:
            o = variant(name, H, W, scale)(q, k, v, Rh, Rw)
            grads = torch.autograd.grad(o, (q, k, v, Rh, Rw), g)
            out[f"exact_{name}"] = dict(out=(o - ref).abs().max().item(),
                                        grads=[(a - b).abs().max().item() for a, b in zip(grads, ref_grads)])
        except Exception as e:
            out[f"exact_{name}"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(name, out[f"exact_{name}"], flush=True)
    # speed, bf16: global ViT-B block at 1024 (batch 8) and a windowed one (8 x 25 windows of 14 x 14)
    for shape, (B, H, W) in {"global": (8, 64, 64), "window": (200, 14, 14)}.items():
        q, k, v, Rh, Rw = relpos_inputs(B, 12, H, W, 64, torch.bfloat16)
        g = torch.randn_like(q)
        for name in names:
            try:
                out[f"{shape}_{name}"] = time_variant(name, variant(name, H, W, scale), (q, k, v, Rh, Rw), g)
            except Exception as e:
                out[f"{shape}_{name}"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(shape, name, out[f"{shape}_{name}"], flush=True)
    RESULTS["attn"] = out


# ---------------------------------------------------------------------------------------------------- relpos

def tune_relpos(out, shape, candidates):
    """Time each kernel of relpos_attention.py over its candidate launch settings at `shape` (B, heads, H,
    W; width 64, bf16), in turn, the best kept in relpos_attention.CONFIG for the next; then forward +
    backward beside the folded SDPA form and attention without the term (and the committed kernels,
    HEAD_KERNELS, when there). out[f"{shape name}_..."]."""
    import relpos_attention as ra
    name, (B, heads, H, W) = shape
    scale = 64 ** -0.5
    q, k, v, Rh, Rw = relpos_inputs(B, heads, H, W, 64, torch.bfloat16)
    g = torch.randn(B, H * W, heads, 64, device="cuda", dtype=torch.bfloat16)
    qkv = torch.stack([q, k, v], 2).transpose(1, 3).detach()  # (B, N, 3, heads, hd), SAM's layout
    o, lse, rel_h, rel_w = ra._relpos_attention(qkv, Rh, Rw, scale)

    def settings(block_m, warps, stages, block_n=None):  # block_m 0: set by the launch (window_backward)
        return dict(num_warps=warps, num_stages=stages, **({"BLOCK_M": block_m} if block_m else {}),
                    **({"BLOCK_N": block_n} if block_n else {}))
    for kernel, tried in candidates.items():
        times = {}
        for c in tried:
            ra.CONFIG[kernel] = settings(*c)
            if kernel.endswith("forward"):
                def fn():
                    ra._relpos_attention(qkv, Rh, Rw, scale)
            else:  # both backward kernels run; only `kernel`'s settings change
                def fn():
                    ra._relpos_attention_backward(g, qkv, Rh, Rw, rel_h, rel_w, o, lse, scale)
            try:
                times[c] = time_ms(fn, 10, 2)
            except Exception as e:
                print("relpos", kernel, c, f"{type(e).__name__}: {str(e)[:300]}", flush=True)
        ra.CONFIG[kernel] = settings(*min(times, key=times.get))
        out[kernel + "_ms"] = {str(c): t for c, t in times.items()}
        print("relpos", kernel, out[kernel + "_ms"], flush=True)
    names = ("triton", "sdpa_cudnn_padv", "nobias_cudnn")
    if HEAD_KERNELS.exists() and name == "global":  # the committed kernels beside these (call ap)
        names = ("triton_head",) + names
    if name == "window":  # the split backward kernels (window_dq, window_dkdv) beside the one-kernel backward
        names = ("triton_split",) + names
    whole = ra.WHOLE_WINDOW
    for variant_name in names:
        ra.WHOLE_WINDOW = 0 if variant_name == "triton_split" else whole
        out[f"{name}_{variant_name}"] = time_variant(variant_name, variant(variant_name.replace("_split", ""), H, W,
                                                                           scale), (q, k, v, Rh, Rw), g.transpose(1, 2))
        print("relpos", name, variant_name, out[f"{name}_{variant_name}"], flush=True)
    ra.WHOLE_WINDOW = whole


def probe_relpos():
    """relpos_attention.py's kernels: fp32 exactness on a 16 x 16 grid and a 14 x 14 window; the row kernels
    at ViT-B's global shape (batch 8, 12 heads, 64 x 64 tokens) and the window kernels at its windows' (8 x 25
    windows of 14 x 14) tuned and timed (tune_relpos). Calls before aw named the global rows without the
    "global_" prefix and had no window kernels."""
    import relpos_attention as ra
    out = {}
    scale = 64 ** -0.5
    for H, W in ((16, 16), (14, 14)):
        q, k, v, Rh, Rw = relpos_inputs(2, 3, H, W, 64, torch.float32)
        g = torch.randn(2, 3, H * W, 64, device="cuda")
        ref = stock_ref(q, k, v, Rh, Rw, H, W, scale)
        ref_grads = torch.autograd.grad(ref, (q, k, v, Rh, Rw), g)
        o = variant("triton", H, W, scale)(q, k, v, Rh, Rw)
        grads = torch.autograd.grad(o, (q, k, v, Rh, Rw), g)
        out[f"exact_fp32_{H}x{W}"] = dict(out=(o - ref).abs().max().item(),
                                          grads=[(a - b).abs().max().item() for a, b in zip(grads, ref_grads)])
    print("relpos", out, flush=True)
    shapes = os.environ.get("PROBE_RELPOS_SHAPES", "global,window").split(",")
    if "global" in shapes:
        tune_relpos(out, ("global", (8, 12, 64, 64)), dict(  # (BLOCK_M, warps, stages[, BLOCK_N])
            forward=[(64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 2), (128, 8, 3)],
            dq=[(64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 3), (128, 8, 2), (128, 8, 3)],
            dkdv=[(32, 4, 2, 64), (64, 4, 2, 64), (64, 4, 3, 64), (32, 4, 2, 128), (32, 4, 3, 128),
                  (64, 4, 2, 128), (64, 8, 2, 128), (64, 8, 3, 128), (128, 8, 2, 128), (16, 4, 2, 128)]))
    if "window" in shapes:
        # ViT's 14 x 14 windows: 196 tokens, so the one-kernel backward (window_backward, every query in a tile
        # of 256); calls before this one tuned the split kernels (window_dq, window_dkdv) here, which now serve
        # only grids of more than relpos_attention.WHOLE_WINDOW tokens
        tune_relpos(out, ("window", (200, 12, 14, 14)), dict(
            window_forward=[(128, 8, 2, 64), (256, 8, 2, 64), (256, 16, 2, 64), (64, 4, 2, 256), (64, 8, 2, 256),
                            (128, 8, 2, 128)],
            window_backward=[(0, 8, 2, 64), (0, 8, 2, 32), (0, 16, 2, 64), (0, 16, 2, 32), (0, 4, 2, 32),
                             (0, 8, 3, 32), (0, 8, 2, 16)]))
    out["best"] = dict(ra.CONFIG)
    print("RELPOS_CONFIG", json.dumps(out["best"]), flush=True)
    RESULTS["relpos"] = out


# ---------------------------------------------------------------------------------------------------- msam

def build_lora(model_name, bs, img=1024):
    import lora
    args = lora.parse_args(["--data", "synthetic", "--model", model_name, "--checkpoint", "none",
                            "--img-size", str(img)])
    dev = common.setup(args, "lora", 1000)
    model = common.load_sam(args, dev)
    lora.inject(model, 4)
    model.to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(bs, 3, img, img, device=dev, generator=g)
    y = torch.randint(0, 2, (bs, img, img), device=dev, generator=g, dtype=torch.uint8)
    return args, dev, model, x, y


def kernel_table(prof, n=400):
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and "CUDA" in str(e.device_type):  # kernels only (CPU ops would count them twice)
            rows.append((t / 1e3, e.count, e.key[:160]))
    rows.sort(reverse=True)
    return dict(total_gpu_ms=sum(r[0] for r in rows), top=rows[:n])


def profile_steps(step, n=5):
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    tab = kernel_table(prof)
    tab["wall_ms_per_step_profiled"] = wall / n
    tab["gpu_ms_per_step"] = tab["total_gpu_ms"] / n
    return tab


def graphed(model, loss_fn, params, x, y, dev):
    """The whole training step (forward, loss, backward, AdamW) captured once and replayed."""
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=dev), fused=True, capturable=True)
    sx, sy = x.clone(), y.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            with common.autocast(dev):
                loss = loss_fn(model, sx, sy)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        with common.autocast(dev):
            static_loss = loss_fn(model, sx, sy)
        static_loss.backward()
        opt.step()

    def replay():
        sx.copy_(x)
        sy.copy_(y)
        graph.replay()
    return replay


def bf16_frozen(model):
    n = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.requires_grad:
            m.weight.data = m.weight.data.to(torch.bfloat16)
            n += 1
    return n


def fused_conv_bn(self, x):
    c, bn = self.c, self.bn
    if bn.training:
        return torch.nn.Sequential.forward(self, x)
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return F.conv2d(x, c.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale,
                    c.stride, c.padding, c.dilation, c.groups)


def tinyvit_block_channels_last(self, x):
    H, W = self.input_resolution
    B, L, C = x.shape
    res_x = x
    if H == self.window_size and W == self.window_size:
        x = self.attn(x)
    else:
        x = x.view(B, H, W, C)
        ws = self.window_size
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // ws, pW // ws
        x = x.view(B, nH, ws, nW, ws, C).transpose(2, 3).reshape(B * nH * nW, ws * ws, C)
        x = self.attn(x)
        x = x.view(B, nH, nW, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
        if pad_b or pad_r:
            x = x[:, :H, :W]
        x = x.reshape(B, L, C)
    x = res_x + x
    x = self.local_conv(x.view(B, H, W, C).permute(0, 3, 1, 2))  # channels-last view: no copy
    x = x.permute(0, 2, 3, 1).reshape(B, L, C)
    return x + self.mlp(x)


def attention_4d_bias(self, x):
    B, N, _ = x.shape
    x = self.norm(x)
    q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]  # (1, heads, N, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(B, N, self.dh))


def apply_variant(model, name):
    from mobile_sam.modeling.tiny_vit_sam import Conv2d_BN, TinyViTBlock
    enc = model.image_encoder
    if name == "bias4d":
        for attn, _ in common.encoder_attentions(enc):
            attn.__class__ = type("A4", (type(attn),), dict(forward=attention_4d_bias))
    if name == "bnfold":
        for m in enc.modules():
            if isinstance(m, Conv2d_BN):
                m.__class__ = type("CBN", (Conv2d_BN,), dict(forward=fused_conv_bn))
    if name == "cl_block":
        for m in enc.modules():
            if isinstance(m, TinyViTBlock):
                m.__class__ = type("TB", (TinyViTBlock,), dict(forward=tinyvit_block_channels_last))
    if name == "cl_stage1":
        enc.patch_embed.register_forward_hook(lambda mod, inp, out: out.contiguous(memory_format=torch.channels_last))


def measure_variant(section, out, name, model, params, x, y, dev, apply=None, ref=None, reps=30, profile=True,
                    shapes=False, firsts=0):
    """One variant of a step probe, into out[f"{name}_..."]: apply() changes the model; then max |logits - ref|
    in eval mode (ref given), `firsts` timed first steps (compilation), the graphed step's ms (reps timed
    after 5 warm ones), an eager profile of 3 steps, and one eager step's copies, adds and casts by input
    shape. An error is recorded and the next variant runs."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    try:
        if apply is not None:
            apply()
        if ref is not None:
            model.eval()
            with torch.no_grad(), common.autocast(dev):
                out[f"{name}_maxdiff"] = (model(x[:2]).float() - ref).abs().max().item()
        model.train()
        opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=dev), fused=True, capturable=True)
        step = common.TrainStep(model, common.default_loss, opt, dev, True)
        if firsts:
            times = []
            for _ in range(firsts):
                t = time.perf_counter()
                step(x, y)
                torch.cuda.synchronize()
                times.append(round(time.perf_counter() - t, 3))
            out[f"{name}_first_steps_s"] = times
        out[f"{name}_graph_ms"] = time_ms(lambda: step(x, y), reps, 5)
        eager = common.TrainStep(model, common.default_loss, opt, dev, False)
        if profile:
            out[f"{name}_profile"] = profile_steps(lambda: eager(x, y), 3)
        if shapes:
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                eager(x, y)
                torch.cuda.synchronize()
            out[f"{name}_ops_by_shape"] = ops_by_shape(prof)
    except Exception as e:
        import traceback
        traceback.print_exc()
        out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(section, name, {k: v for k, v in out.items() if k.startswith(name) and "profile" not in k
                          and "shape" not in k}, flush=True)


def probe_msam():
    out = {}
    args, dev, model, x, y = build_lora("mobile_sam", 8)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model.eval()
    with torch.no_grad(), common.autocast(dev):
        ref = model(x[:2]).float()
    model.train()
    for name in ("default", "bias4d", "bnfold", "cl_block", "cl_stage1"):  # cumulative
        measure_variant("msam", out, name, model, params, x, y, dev, apply=lambda: apply_variant(model, name),
                        ref=ref, reps=20, profile=name in ("default", "cl_stage1"))
    RESULTS["msam"] = out


# ---------------------------------------------------------------------------------------------------- msam2

def ops_by_shape(prof, names=("aten::add", "aten::add_", "aten::copy_", "aten::cat", "aten::_to_copy",
                                "aten::clone", "aten::fill_", "aten::native_layer_norm", "aten::convolution",
                                "aten::convolution_backward", "aten::mul", "aten::sum"), n=60):
    """The device time of the named ops, grouped by their input shapes (which of them are which tensors)."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in names:
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            rows.append((t / 1e3, e.count, e.key, str(e.input_shapes)[:150]))
    rows.sort(reverse=True)
    return rows[:n]


def probe_msam2():
    """MobileSAM LoRA step at batch 8 as common.run trains it (fast path, frozen weights in bf16, graphed):
    first with TinyViT's LayerNorms as stock runs them under autocast (ln_fp32), then as the fast path runs
    them (now: common.layer_norm_in_compute_dtype); an eager profile of each, and the copies, adds and casts
    of the step by input shape. Call af ran this with a third variant, the TinyViT blocks compiled."""
    out = {}
    args, dev, model, x, y = build_lora("mobile_sam", 8)
    common.frozen_weights_to_bf16(model)
    params = [p for p in model.parameters() if p.requires_grad]
    norms = [m for m in model.image_encoder.modules() if type(m).__name__ == "ComputeDtypeLayerNorm"]
    out["norms_swapped"] = len(norms)
    fast_norm = type(norms[0]) if norms else None

    def norms_as(cls):
        for m in norms:
            m.__class__ = cls
    measure_variant("msam2", out, "ln_fp32", model, params, x, y, dev, apply=lambda: norms_as(torch.nn.LayerNorm),
                    shapes=True)
    measure_variant("msam2", out, "now", model, params, x, y, dev, apply=lambda: norms_as(fast_norm), shapes=True)
    RESULTS["msam2"] = out


def conv_bn_as_conv(self, x):
    """common.folded_conv_bn as it was before its 1x1 convolutions ran as matmuls: F.conv2d for all."""
    conv, bn = self.c, self.bn
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return F.conv2d(x, conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale,
                    conv.stride, conv.padding, conv.dilation, conv.groups)


def classes_named(model, name):
    return [m for m in model.modules() if type(m).__name__ == name]


def probe_msam3():
    """MobileSAM LoRA step (graphed, frozen weights in bf16) before the 1x1 convolutions ran as matmuls and
    LayerNorm2d as one kernel (before), with the first (conv1x1), with both (ln2d: as common.py trains now).
    Call ah measured prototypes of the two in this script, the same code as common.py's now (its "now" row
    is this "before")."""
    out = {}
    args, dev, model, x, y = build_lora("mobile_sam", 8)
    common.frozen_weights_to_bf16(model)
    params = [p for p in model.parameters() if p.requires_grad]
    convs, norms = classes_named(model, "FoldedConv2d_BN"), classes_named(model, "OneKernelLayerNorm2d")
    out["ln2d_swapped"] = len(norms)
    conv_cls, norm_cls = type(convs[0]), type(norms[0])
    old_conv = type("ConvBNasConv", (conv_cls,), dict(forward=conv_bn_as_conv))

    def set_classes(conv, norm):
        for m in convs:
            m.__class__ = conv
        for m in norms:
            m.__class__ = norm
    set_classes(old_conv, norm_cls.__bases__[0])
    model.eval()
    with torch.no_grad(), common.autocast(dev):
        ref = model(x[:2]).float()
    measure_variant("msam3", out, "before", model, params, x, y, dev, ref=ref)
    measure_variant("msam3", out, "conv1x1", model, params, x, y, dev, ref=ref,
                    apply=lambda: set_classes(conv_cls, norm_cls.__bases__[0]))
    measure_variant("msam3", out, "ln2d", model, params, x, y, dev, ref=ref,
                    apply=lambda: set_classes(conv_cls, norm_cls))
    RESULTS["msam3"] = out


def probe_vitb2():
    """ViT-B LoRA step (compiled, graphed, frozen weights in bf16) as common.run trained it before this probe's
    changes (before: blocks[1:] compiled, stock LayerNorm2d), then with LayerNorm2d as one kernel (ln2d),
    then with the first block compiled too on the windowed blocks' graph (block0: common.share_first_block_graph;
    as common.py trains now). Profiles: eager steps through the compiled blocks. first_steps_s: warm-up and
    capture (this process's inductor cache is fresh for the first variant only). Call ah measured prototypes
    of the two in this script, the same code as common.py's now (its "now" row is this "before")."""
    out = {}
    args, dev, model, x, y = build_lora("vit_b", 8)
    common.frozen_weights_to_bf16(model)
    norms = classes_named(model, "OneKernelLayerNorm2d")
    norm_cls = type(norms[0])
    for m in norms:
        m.__class__ = norm_cls.__bases__[0]
    import torch._inductor.config
    torch._inductor.config.triton.autotune_pointwise = False  # as common.compile_model
    torch._dynamo.config.recompile_limit = 64
    enc = model.image_encoder
    for blk in enc.blocks[1:]:
        blk.compile()
    params = [p for p in model.parameters() if p.requires_grad]

    def first_block():
        common.share_first_block_graph(enc)
        enc.blocks[0].compile()

    def norms_one_kernel():
        for m in norms:
            m.__class__ = norm_cls
    for name, apply in (("before", None), ("ln2d", norms_one_kernel), ("block0", first_block)):
        measure_variant("vitb2", out, name, model, params, x, y, dev, apply=apply, reps=20, firsts=5,
                        profile=name != "ln2d")
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    RESULTS["vitb2"] = out


def values_only_attention(self, x):
    """A floor for probe_vitb3, not attention: a global block's qkv and proj with its values passed straight
    through, x (B, H, W, C) -> (B, H, W, C)."""
    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1)
    return self.proj(qkv[:, :, 2].reshape(B, H, W, -1))


def probe_vitb3():
    """ViT-B LoRA step as common.run trains it (load_sam's fast path, frozen weights in bf16, compile_model,
    graphed), changes applied one after another: the global blocks' kernels of the committed
    relpos_attention.py (head, when HEAD_KERNELS is there; call aq), the working tree's (now: every kernel
    profiled, eager ops by shape), the encoder neck's convolution weights channels-last (neck_cl, call aq).
    Call aq also ran lora_cat after them, a prototype of LoRAQKV.forward's one down-projection product, which
    is now the code itself (the variant was dropped since). PROBE_VITB3 (comma-separated) picks variants:
    call ar ran now,conv_patch_embed (the patch embedding back to stock's convolution), call aw
    now,folded_windows (the windowed blocks' attention back to the folded SDPA form). Calls bp and bq compiled the
    decoder side in common.compile_model (bp: now,eager_decoder, that undone; bq: PROBE_DECODER_PARTS=transformer,
    only that part): with today's code, now,decoder_compiled. now,padded_windows: the windowed blocks on stock's
    padded windows, as before fast_vit_window_attention (call bv). Call cm ran now,merged_k,merged_k_split:
    LoRA's update inside the qkv product, its backward as one product or two (merged_k is now
    common.linear_with_qv_update; the variants were dropped since, see git show of this file at that call).
    PROBE_VITB3=launch: relpos_attention's launch settings that scripts/kernel_registers.py --sweep finds to fit
    more warps per SM without spilling, each in the step, between two runs of the committed ones (call dc: all
    slower). Call dl ran now,global_no_term,decoder_compiled,bf16_stream,global_none,windows_none: floors,
    each on top of the ones before (values_only_attention, global_attention below), for how fast the step
    could get with a global attention as fast as one without the rel-pos term, with every other lever
    measured so far, and with no attention at all."""
    import os
    out = {}
    args, dev, model, x, y = build_lora("vit_b", 8)
    common.frozen_weights_to_bf16(model)
    common.compile_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    own = common._RELPOS

    def kernels(module):
        def apply():
            common._RELPOS = module
            torch._dynamo.reset()  # the compiled blocks trace the attention again, with these kernels
        return apply

    def neck_channels_last():
        for m in model.image_encoder.neck.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)

    def conv_patch_embed():
        embed = model.image_encoder.patch_embed
        embed.__class__ = type(embed).__bases__[0]

    def decoder_compiled():
        # the encoder's neck, the decoder's transformer and its output upscaling compiled too, or those of them
        # PROBE_DECODER_PARTS names; calls bp-br ran this inside common.compile_model (since reverted)
        named = dict(neck=model.image_encoder.neck, transformer=model.mask_decoder.transformer,
                     upscaling=model.mask_decoder.output_upscaling)
        for name in os.environ.get("PROBE_DECODER_PARTS", ",".join(named)).split(","):
            named[name].compile()

    def padded_windows():
        # the windowed blocks' attention on stock's padded windows (70 x 70 tokens at 1024), as before
        # common.fast_vit_window_attention: their qkv marked as not tokenwise (see common.tokenwise)
        for blk in model.image_encoder.blocks:
            if blk.window_size > 0:
                blk.attn.qkv.tokenwise = False
        torch._dynamo.reset()

    def folded_windows():
        for blk in model.image_encoder.blocks:
            if blk.window_size > 0:
                blk.attn.fast_relpos = False  # the windowed blocks' folded SDPA form, as before the window kernels
        torch._dynamo.reset()

    def autotune_mm(persistent_tma=False):
        # inductor's GEMM autotuning in the compiled blocks (Triton templates against cuBLAS, the winner's
        # pointwise epilogue fused: GELU into fc1's product, GELU's backward into fc2's input gradient);
        # persistent_tma: Hopper's persistent TMA templates among the choices (call cs)
        def apply():
            import torch._inductor.config as inductor_config
            inductor_config.max_autotune_gemm = True
            inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
            inductor_config.triton.enable_persistent_tma_matmul = persistent_tma
            torch._dynamo.reset()
        return apply
    import relpos_attention
    committed = {kernel: dict(settings) for kernel, settings in relpos_attention.CONFIG.items()}

    def launch(**settings):
        # relpos_attention's launch settings for the kernels named, in place of the committed ones (whole: a
        # setting left out, such as maxnreg, is dropped); the kernels read them at each launch and Triton compiles
        # each new setting at its first, so the step only needs capturing again (measure_variant does that)
        def apply():
            relpos_attention.CONFIG.clear()
            relpos_attention.CONFIG.update({kernel: dict(v) for kernel, v in committed.items()}, **settings)
        return apply

    # settings that compile without spilling to more warps per SM than the committed ones on the lent H200's
    # Triton 3.6 (scripts/kernel_registers.py --sweep, no GPU needed; committed: forward 12 warps per SM with a
    # 120-byte spill, the backward kernels 8, the window forward 16, the window backward 8 with an 88-byte
    # spill), and the window backward's settings that do not spill: the variants to time in one process, the
    # committed settings ("now") first and last, since the isolated timings of scripts/ncu_global_attention.py
    # favoured a window forward that was slower in this step (calls da, db)
    candidates = dict(
        fwd_m32_w8=launch(forward=dict(BLOCK_M=32, num_warps=8, num_stages=3)),  # 107 registers: 16 warps per SM
        fwd_m32_w4=launch(forward=dict(BLOCK_M=32, num_warps=4, num_stages=3)),  # 155: 12, no spill
        dq_m32_w8=launch(dq=dict(BLOCK_M=32, num_warps=8, num_stages=3)),  # 102: 16
        dkdv_m32_w8=launch(dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3)),  # 122: 16
        wf_m64_n32_w8=launch(window_forward=dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3)),  # 74: 24
        wb_n16_s1=launch(window_backward=dict(BLOCK_N=16, num_warps=8, num_stages=1)),  # 213: 8, no spill
        wb_n32=launch(window_backward=dict(BLOCK_N=32, num_warps=8, num_stages=2)),  # 230: 8, no spill
        now_again=launch())

    def bf16_stream():
        # the residual stream in bf16: pos_embed stored in bf16 (probe_regions measured it alone, call dk; not
        # kept, it moves what the frozen encoder computes)
        model.image_encoder.pos_embed.data = model.image_encoder.pos_embed.data.to(torch.bfloat16)
        torch._dynamo.reset()

    def global_attention(floor):
        # floors, not code: the global blocks' attention without the rel-pos term, through SDPA as PyTorch picks
        # its kernel ("no_term"), or none at all, the projection reading v ("none"): what a kernel that computes
        # the term could at best reach, and the step without any global attention
        def apply():
            for blk in model.image_encoder.blocks:
                if blk.window_size == 0 and floor == "no_term":
                    blk.attn.use_rel_pos = False  # fast_vit_attention's SDPA path, no term
                elif blk.window_size == 0:
                    blk.attn.__class__ = type("ValuesOnly", (type(blk.attn),), dict(forward=values_only_attention))
            torch._dynamo.reset()
        return apply

    def windows_none():
        # the windowed blocks' attention passed over likewise (their qkv and proj kept): with global_none, the step
        # without any attention
        common.fast_vit_window_attention = lambda attn, x, qkv, window: attn.proj(qkv[:, :, 2].reshape(x.shape))
        torch._dynamo.reset()

    # head (the committed kernels, call aq) needs kernels that take what common.fast_vit_attention passes
    # (rel_h and rel_w until call ay, the tables since): two commits are compared in two processes since
    variants = dict(now=kernels(own), neck_cl=neck_channels_last, conv_patch_embed=conv_patch_embed,
                    folded_windows=folded_windows, decoder_compiled=decoder_compiled, padded_windows=padded_windows,
                    autotune_mm=autotune_mm(), autotune_tma=autotune_mm(True), bf16_stream=bf16_stream,
                    global_no_term=global_attention("no_term"), global_none=global_attention("none"),
                    windows_none=windows_none, **candidates)
    if os.environ.get("PROBE_VITB3") == "launch":  # the launch-setting candidates between two runs of "now"
        os.environ["PROBE_VITB3"] = ",".join(["now", *candidates])
    picked = os.environ.get("PROBE_VITB3", ",".join(variants)).split(",")
    for name in picked:
        measure_variant("vitb3", out, name, model, params, x, y, dev, apply=variants[name], reps=20, firsts=3,
                        profile=name in ("now", "global_no_term", "global_none", "windows_none")
                        or name.startswith("autotune") or name in candidates,
                        shapes=name == "now")
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    out["compile_times"] = torch._dynamo.utils.compile_times()  # dynamo's and inductor's phases, per graph
    RESULTS["vitb3"] = out


# ---------------------------------------------------------------------------------------------------- regions

def probe_regions():
    """ViT-B LoRA step at batch 8 as common.run trains it (fast path, frozen weights in bf16, compiled blocks,
    graphed): where its GPU time goes by part of the model, then what the dtype of the residual stream costs.
    1. One eager step profiled, its ops under record_function ranges: the input normalisation, the patch
       embedding with pos_embed, the encoder blocks (their forward), the neck, the mask decoder, the loss; the
       backward by autograd node (the blocks' backward is CompiledFunctionBackward) and the optimizer.
    2. The residual stream in bf16. Under autocast stock SAM's stream is fp32: the patch embedding's bf16
       output plus pos_embed (an fp32 parameter) promotes to fp32, and every block adds its bf16 branch
       outputs to it. pos_embed stored in bf16 keeps the stream in bf16 (half the bytes in every norm, add
       and cast of the blocks). How far each stream moves the image embeddings and logits from the fp32 model
       without autocast (relative L2 error; random weights, pos_embed drawn at a trained one's scale, since
       SAM initialises it to zeros), then its graphed step, timed between two runs of the fp32 stream."""
    from collections import defaultdict
    from torch.autograd import DeviceType
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile
    out = {}
    args, dev, model, x, y = build_lora("vit_b", 8)
    enc = model.image_encoder
    with torch.no_grad():
        enc.pos_embed.normal_(0, 0.02)
        model.eval()  # the reference: fp32 weights, no autocast
        ref_emb = model.encode(x[:2]).float()
        ref_logits = model(x[:2]).float()
    common.frozen_weights_to_bf16(model)
    streams = dict(stream_fp32=torch.float32, stream_bf16=torch.bfloat16)
    for name, dtype in streams.items():  # before any step changes what trains (LoRA's B is still 0)
        enc.pos_embed.data = enc.pos_embed.data.to(dtype)
        with torch.no_grad(), common.autocast(dev):
            emb, logits = model.encode(x[:2]).float(), model(x[:2]).float()
        out[f"{name}_rel_err_vs_fp32_model"] = dict(
            embeddings=((emb - ref_emb).norm() / ref_emb.norm()).item(),
            logits=((logits - ref_logits).norm() / ref_logits.norm()).item())
    print("regions", {k: v for k, v in out.items() if "rel_err" in k}, flush=True)
    enc.pos_embed.data = enc.pos_embed.data.float()
    model.train()
    common.compile_model(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def encode(images):  # ImageEncoderViT.forward, in ranges
        with record_function("R_normalise"):
            t = (images.to(model.pixel_mean.dtype) - model.pixel_mean) / model.pixel_std
        with record_function("R_patch_embed"):
            t = enc.patch_embed(t) + enc.pos_embed
        with record_function("R_blocks"):
            for blk in enc.blocks:
                t = blk(t)
        with record_function("R_neck"):
            return enc.neck(t.permute(0, 3, 1, 2))
    stock_decode = model.decode

    def decode(embeddings, images):
        with record_function("R_decoder"):
            return stock_decode(embeddings, images)

    def loss_fn(m, images, masks):
        logits = m(images)
        with record_function("R_loss"):
            return common.segmentation_loss(logits, masks)
    model.encode, model.decode = encode, decode
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device=dev), fused=True, capturable=True)
    step = common.TrainStep(model, loss_fn, opt, dev, True)
    out["graph_ms"] = time_ms(lambda: step(x, y), 20, 5)
    eager = common.TrainStep(model, loss_fn, opt, dev, False)
    for _ in range(2):
        eager(x, y)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        eager(x, y)
        torch.cuda.synchronize()
    parts, inside = defaultdict(float), defaultdict(lambda: defaultdict(float))  # ms by part; by op and shape in it
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            continue
        if e.cpu_parent is None:  # a forward range, a backward node, the optimizer
            name = e.name.replace("autograd::engine::evaluate_function: ", "backward ")
            parts[name] += e.device_time_total / 1e3
            if name.startswith("backward ") and e.cpu_children:
                inside["backward"][f"{name} {str(e.cpu_children[0].input_shapes)[:100]}"] += e.device_time_total / 1e3
        if e.name.startswith("R_"):
            for c in e.cpu_children:
                inside[e.name][f"{c.name} {str(c.input_shapes)[:110]}"] += c.device_time_total / 1e3
    out["gpu_ms_by_part"] = sorted(((round(v, 3), k) for k, v in parts.items() if v > 0), reverse=True)
    out["gpu_ms_in_part"] = {part: sorted(((round(v, 3), k) for k, v in ops.items() if v > 0), reverse=True)[:30]
                             for part, ops in inside.items()}
    print("regions", out["graph_ms"], out["gpu_ms_by_part"][:12], flush=True)

    for name, dtype in [*streams.items(), ("stream_fp32_again", torch.float32)]:
        enc.pos_embed.data = enc.pos_embed.data.to(dtype)
        graphed = common.TrainStep(model, loss_fn, opt, dev, True)
        t = time.perf_counter()
        graphed(x, y)
        torch.cuda.synchronize()
        out[f"{name}_first_step_s"] = round(time.perf_counter() - t, 3)
        out[f"{name}_graph_ms"] = time_ms(lambda: graphed(x, y), 20, 5)
        print("regions", name, out[f"{name}_graph_ms"], flush=True)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    RESULTS["regions"] = out


# ---------------------------------------------------------------------------------------------------- vitb

def probe_vitb():
    import os
    out = dict(kernel=os.environ.get("PEFT_SAM_GLOBAL_ATTENTION", "sdpa"))
    import torch._logging
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    args, dev, model, x, y = build_lora("vit_b", 8)
    common.use_fast_attention(model.image_encoder)  # (load_sam applied it already)
    common.frozen_weights_to_bf16(model)
    t = time.perf_counter()
    common.compile_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    model.train()

    def step():
        with common.autocast(dev):
            loss = common.default_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    firsts = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        firsts.append(time.perf_counter() - t)
    out["first_steps_s"] = firsts
    out["step_ms"] = time_ms(step, 10)
    out["imgs_per_s"] = 8e3 / out["step_ms"]
    print("vitb", out, flush=True)
    out["profile"] = profile_steps(step, 3)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    RESULTS["vitb_" + out["kernel"]] = out


# ---------------------------------------------------------------------------------------------------- gelu

def probe_gelu():
    """The ViT-B MLP's GELU at batch 8, 1024 (h: (8, 64, 64, 3072) bf16), forward and backward as inductor
    compiles them in the blocks, against pointwise kernels that move the same bytes with almost no arithmetic
    (2 h; d * h), with tanh's approximation, and with pointwise autotuning on (common.compile_model turns it
    off): whether the two GELU kernels of the step (about 4.2 ms of it, call dl) wait on memory or on erf."""
    import torch._inductor.config as inductor_config
    g = torch.Generator(device="cuda").manual_seed(0)
    h, d = (torch.randn(8, 64, 64, 3072, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    kinds = dict(copy_like=(lambda h: h * 2, (h,)), gelu=(F.gelu, (h,)),
                 gelu_tanh=(lambda h: F.gelu(h, approximate="tanh"), (h,)),
                 backward_copy_like=(lambda d, h: d * h, (d, h)),
                 gelu_backward=(lambda d, h: torch.ops.aten.gelu_backward(d, h), (d, h)),
                 gelu_backward_tanh=(lambda d, h: torch.ops.aten.gelu_backward(d, h, approximate="tanh"), (d, h)))
    out = {}
    for autotune in (False, True):
        inductor_config.triton.autotune_pointwise = autotune
        torch._dynamo.reset()
        for name, (fn, inputs) in kinds.items():
            compiled = torch.compile(fn)
            ms = time_ms(lambda: compiled(*inputs), 50, 5)
            moved = (len(inputs) + 1) * h.numel() * h.element_size()  # inputs read, one output written
            key = f"{name}_autotuned" if autotune else name
            out[key] = dict(ms=round(ms, 4), tb_per_s=round(moved / ms / 1e9, 2))
    print("gelu", out, flush=True)
    RESULTS["gelu"] = out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("sections", nargs="+")
    p.add_argument("--out", default="runs/probe")
    a = p.parse_args()
    torch.backends.cudnn.benchmark = True
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in a.sections:
        t = time.perf_counter()
        try:
            globals()[f"probe_{s}"]()
        except Exception as e:
            import traceback
            traceback.print_exc()
            RESULTS[s + "_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        RESULTS[s + "_seconds"] = time.perf_counter() - t
        (out / "probe.json").write_text(json.dumps(RESULTS, indent=1))
    print(json.dumps({k: v for k, v in RESULTS.items() if "profile" not in str(k)}, indent=1)[:6000])


if __name__ == "__main__":
    main()

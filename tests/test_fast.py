"""The fast layer (the package fast/): its swapped forwards must give stock SAM's results (fp32, tolerances
stated per test), with and without adapters, forward and backward: attention through
scaled_dot_product_attention with the decomposed rel-pos term folded into q and k, LoRA's q/v update inside
the qkv matmul, TinyViT's layout, one-kernel norms, the patch embedding as a matmul. Also what fast.apply and
fast.training_step do to a built model, and what --no-fast leaves out."""
import copy
import functools
import importlib
import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import common
import fast
import lora
from fast import forwards
from fast.forwards import swap_class, use_fast_forwards, vit_attentions
from fast.step import GraphedStep, configure_compilation, frozen_weights_to_bf16

TOL = 1e-5  # max |fast - stock| of one attention in fp32; measured ~1e-6 (exactly 0 where SDPA's math path runs)


def tiny_model(extra=()):
    """The tiny random SAM as load_sam gives it: stock segment_anything forwards, nothing of the fast layer."""
    args = lora.parse_args(["--model", "tiny", "--device", "cpu", *extra])
    device = cli.setup(args, "lora", gpu_steps=10)
    return args, common.load_sam(args, device)


# how each method's main() calls its inject, from its command line's arguments
INJECT = {
    "lora": lambda mod, model, a: mod.inject(model, a.rank),
    "atrous_lora": lambda mod, model, a: mod.inject(model, a.rank, mod.parse_rates(a.rates)),
    "salt": lambda mod, model, a: mod.inject(model, a),
    "balr_sam": lambda mod, model, a: mod.inject(model, a.rank, a.decoder_rank, a.cden_width),
    "samora": lambda mod, model, a: mod.inject(model, a.rank, a.hl_width, a.hl_heads),
}
METHODS = list(INJECT)


def method_model(method, extra=()):
    """A tiny SAM with `method`'s adapter, built as its main() builds it (common.build_model: the adapter,
    the spare mask tokens frozen, the fast layer unless --no-fast in `extra`)."""
    mod = importlib.import_module(method)
    args = mod.parse_args(["--model", "tiny", "--device", "cpu", *extra])
    device = cli.setup(args, method, gpu_steps=10)
    return args, common.build_model(args, device, lambda model: INJECT[method](mod, model, args))


def randomise(module, seed=0):
    """Non-zero rel-pos tables (SAM initialises them at zero, which would hide a wrong rel-pos term) and
    non-zero LoRA B (zero at init, which would hide a LoRA path that the fast forward skipped)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "rel_pos" in name or "lora_B" in name or "attention_biases" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)


def vit_encoder(*blocks, **parts):
    """A stand-in for SAM ViT's image encoder holding `blocks` (and e.g. patch_embed=...)."""
    encoder = nn.Module()
    encoder.blocks = nn.ModuleList(blocks)
    for name, part in parts.items():
        setattr(encoder, name, part)
    return encoder


def attn_block(attn):
    """A stand-in for a ViT block that holds `attn` as blocks[i].attn (not a segment_anything Block: its own
    forward is not swapped)."""
    blk = nn.Module()
    blk.attn = attn
    return blk


def make_fast(image_encoder, **kwargs):
    """fast.forwards.use_fast_forwards on a model that holds only `image_encoder`; returns that model."""
    model = nn.Module()
    model.image_encoder = image_encoder
    use_fast_forwards(model, **kwargs)
    return model


def vit_attention(side, lora_rank=0, grid=None):
    """One SAM ViT attention at ViT-B's head width 64 (2 heads of 64), on a side x side token grid (or
    grid = (rows, columns))."""
    from segment_anything.modeling.image_encoder import Attention
    attn = Attention(128, num_heads=2, qkv_bias=True, use_rel_pos=True, input_size=grid or (side, side))
    if lora_rank:
        attn.qkv = lora.LoRAQKV(attn.qkv, lora_rank)
    randomise(attn)
    return attn


def fast_copy(module):
    fast_attn = copy.deepcopy(module)
    make_fast(vit_encoder(attn_block(fast_attn)))  # as a ViT's blocks[i].attn
    assert type(fast_attn).__name__ == "FastAttention" and isinstance(fast_attn, type(module))
    return fast_attn


@pytest.mark.parametrize("side", [14, 16])  # a ViT-B window (14 x 14), a global grid (16 x 16)
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_attention_forward_and_backward_match_stock(side, lora_rank):
    stock = vit_attention(side, lora_rank)
    fast_attn = fast_copy(stock)
    if lora_rank:  # LoRA's q/v update goes inside the qkv matmul (fused_lora_qkv)
        assert type(fast_attn.qkv).__name__ == "FusedLoRAQKV" and fast_attn.qkv.fused_heads is None
    x = torch.randn(3, side, side, 128, requires_grad=True)
    y_stock = stock(x)
    y_fast = fast_attn(x)
    assert (y_fast - y_stock).abs().max() < TOL
    g = torch.randn_like(y_stock)
    gx_stock, *gp_stock = torch.autograd.grad(y_stock, [x, *stock.parameters()], g)
    gx_fast, *gp_fast = torch.autograd.grad(y_fast, [x, *fast_attn.parameters()], g)
    assert (gx_fast - gx_stock).abs().max() < TOL * max(1.0, gx_stock.abs().max().item())
    for a, b in zip(gp_fast, gp_stock):  # rel-pos tables and LoRA paths get the stock gradients
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("pad_v", [True, False])
def test_value_padding_does_not_change_the_result(pad_v):
    stock = vit_attention(14)
    fast_attn = fast_copy(stock)
    fast_attn.fast_pad_v = pad_v
    x = torch.randn(2, 14, 14, 128)
    with torch.no_grad():
        assert (fast_attn(x) - stock(x)).abs().max() < TOL


def test_rel_pos_table_of_another_size_is_resized_as_stock():
    """A global block whose table was made for another grid: stock interpolates it on the fly."""
    stock = vit_attention(16)
    fast_attn = fast_copy(stock)
    x = torch.randn(1, 12, 12, 128)  # 12 x 12 tokens, table for 16 x 16 (31 rows, 23 wanted)
    with torch.no_grad():
        assert (fast_attn(x) - stock(x)).abs().max() < TOL


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_n_matrix_is_materialised():
    side, B, heads = 32, 2, 2  # N = 1024 tokens: N x N logits dwarf every (N, channels) tensor
    stock = vit_attention(side)
    fast_attn = fast_copy(stock)
    x = torch.randn(B, side, side, 128)
    N = side * side
    with torch.no_grad():
        with LargestTensor() as seen_stock:
            stock(x)
        with LargestTensor() as seen_fast:
            fast_attn(x)
    assert seen_stock.largest >= B * heads * N * N  # stock builds (B*heads, N, N) logits
    assert seen_fast.largest < B * heads * N * N / 4  # fast: at most (B, N, 3C) or (B, heads, N, 128)


@pytest.mark.parametrize("img_size", [128, 160])  # 160: a 10 x 10 grid, padded to 12 x 12 for 4 x 4 windows
def test_tiny_sam_with_lora_matches_stock(img_size):
    """The whole fast layer's forwards (use_fast_forwards) against stock SAM (load_sam's model), fp32."""
    args, stock = tiny_model(["--img-size", str(img_size)])
    lora.inject(stock, rank=4)
    randomise(stock)
    fast_model = copy.deepcopy(stock)
    use_fast_forwards(fast_model)
    attns = vit_attentions(fast_model.image_encoder)
    assert all(type(a).__name__ == "FastAttention" for a, _ in attns)
    assert all(type(a.qkv).__name__ == "FusedLoRAQKV" for a, _ in attns)
    assert {"FastDecoderAttention", "OneKernelLayerNorm2d", "FastBlock", "MatmulPatchEmbed"} <= {
        type(m).__name__ for m in fast_model.modules()}
    assert not any(type(m).__module__ == forwards.__name__ for m in stock.modules())  # load_sam: all stock
    assert set(fast_model.state_dict()) == set(stock.state_dict())  # same keys: checkpoints load either way
    x = torch.rand(2, 3, img_size, img_size)
    masks = (torch.rand(2, img_size, img_size) < 0.2).to(torch.uint8)
    out_stock, out_fast = stock(x), fast_model(x)
    assert (out_fast - out_stock).abs().max() < 1e-4 * out_stock.abs().max()  # through 2 blocks + decoder
    common.segmentation_loss(out_stock, masks).backward()
    common.segmentation_loss(out_fast, masks).backward()
    grads = {n: p.grad for n, p in stock.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values())
    for n, p in fast_model.named_parameters():
        if n in grads:
            assert (p.grad - grads[n]).abs().max() < 1e-4 * grads[n].abs().max(), n


@pytest.mark.parametrize("downsample,query_batch", [(1, 3), (2, 1)])  # self-attention; tokens at batch 1
def test_decoder_attention_matches_stock(downsample, query_batch):
    """The mask decoder's attention through SDPA (fast.forwards.decoder_attention) against stock's, fp32,
    forward and backward, with 5 tokens attending to 64 image tokens of 3 images (at batch 1 beside the
    3 images, as prompt-free decoding passes them) and the other way round."""
    from segment_anything.modeling.transformer import Attention
    torch.manual_seed(0)
    stock = Attention(32, num_heads=2, downsample_rate=downsample)
    fast_attn = copy.deepcopy(stock)
    swap_class(fast_attn, "FastDecoderAttention", forward=forwards.decoder_attention)
    tokens = torch.randn(query_batch, 5, 32, requires_grad=True)
    image = torch.randn(3, 64, 32, requires_grad=True)
    for q, kv in ((tokens, image), (image, tokens)):
        outs, grads = [], []
        for m in (stock, fast_attn):
            out = m(q, kv, kv)
            (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
            outs.append(out.detach())
            grads.append([t.grad.clone() for t in (tokens, image)] + [p.grad.clone() for p in m.parameters()])
            for t in (tokens, image):
                t.grad = None
        assert outs[0].shape == outs[1].shape == (3, q.shape[1], 32)
        assert (outs[0] - outs[1]).abs().max() < TOL
        for a, b in zip(*grads):
            assert (a - b).abs().max() < TOL * max(1.0, a.abs().max().item())


def test_fast_forwards_are_idempotent_and_survive_a_later_lora():
    args, model = tiny_model()
    use_fast_forwards(model)
    swapped = {type(m) for m in model.modules() if type(m).__module__ == forwards.__name__}
    use_fast_forwards(model)  # a second call changes nothing: no subclass of a subclass
    assert {type(m) for m in model.modules() if type(m).__module__ == forwards.__name__} == swapped
    assert all(cls.__bases__[0].__module__ != forwards.__name__ for cls in swapped)
    classes = {type(a) for a, _ in vit_attentions(model.image_encoder)}
    assert len(classes) == 1 and next(iter(classes)).__bases__[0].__name__ == "Attention"
    stock = copy.deepcopy(model)
    for m in stock.modules():  # every swapped forward back to stock's
        if type(m).__module__ == forwards.__name__:
            m.__class__ = type(m).__bases__[0]
    for m in (model, stock):  # LoRA after the swap: the fast forward must still call attn.qkv
        torch.manual_seed(2)  # the same LoRA A in both
        lora.inject(m, rank=2)
        randomise(m, seed=3)
    x = torch.rand(1, 3, args.img_size, args.img_size)
    with torch.no_grad():
        assert (model(x) - stock(x)).abs().max() < 1e-4 * stock(x).abs().max()


def tinyvit_encoder(attn):
    """A stand-in for MobileSAM's TinyViT holding `attn` as layers[1].blocks[0].attn (layers[0] is
    convolutional)."""
    blk = nn.Module()
    blk.attn = attn
    layer = nn.Module()
    layer.blocks = nn.ModuleList([blk])
    encoder = nn.Module()
    encoder.layers = nn.ModuleList([nn.Identity(), layer])
    return encoder


@pytest.mark.parametrize("training", [True, False])  # stock TinyViT uses a cached bias in eval mode
def test_tinyvit_attention_matches_stock(training):
    from mobile_sam.modeling.tiny_vit_sam import Attention
    stock = Attention(dim=64, key_dim=32, num_heads=2, attn_ratio=1, resolution=(7, 7))
    stock.qkv = lora.LoRAQKV(stock.qkv, rank=2, heads=2)
    randomise(stock)
    stock.train(training)
    fast_attn = copy.deepcopy(stock)
    make_fast(tinyvit_encoder(fast_attn))
    assert type(fast_attn).__name__ == "FastTinyViTAttention"
    assert type(fast_attn.qkv).__name__ == "FusedLoRAQKV" and fast_attn.qkv.fused_heads == 2  # per-head layout
    x = torch.randn(4, 49, 64)  # (B*nW, 7*7, C)
    with torch.no_grad():
        assert (fast_attn(x) - stock(x)).abs().max() < TOL


def test_mobile_sam_fast_forwards_match_stock():
    """The whole MobileSAM with LoRA, fp32: fast attention, the fused LoRA update, folded BatchNorms and
    channels-last convolutions give stock's logits and stock's LoRA gradients. BatchNorm statistics are
    randomised (the pretrained ones would hide a fold that ignored them)."""
    args = lora.parse_args(["--model", "mobile_sam", "--device", "cpu", "--img-size", "1024"])
    device = cli.setup(args, "lora", gpu_steps=10)
    stock = common.load_sam(args, device)
    lora.inject(stock, rank=4)
    randomise(stock)
    g = torch.Generator().manual_seed(1)
    for m in stock.image_encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    fast_model = copy.deepcopy(stock)
    use_fast_forwards(fast_model)
    kinds = {type(m).__name__ for m in fast_model.image_encoder.modules()}
    assert {"FastTinyViTBlock", "FoldedConv2d_BN", "ChannelsLastPatchEmbed", "FastTinyViTAttention",
            "ComputeDtypeLayerNorm", "FusedLoRAQKV"} <= kinds
    x = torch.rand(1, 3, 1024, 1024, generator=g)
    masks = (torch.rand(1, 1024, 1024, generator=g) < 0.2).to(torch.uint8)
    logits = []
    for m in (stock, fast_model):
        m.train()
        out = m(x)
        common.segmentation_loss(out, masks).backward()
        logits.append(out.detach())
    assert (logits[0] - logits[1]).abs().max() < 1e-4 * logits[0].abs().max()
    for (n, a), (_, b) in zip(stock.named_parameters(), fast_model.named_parameters()):
        if "lora_" in n:
            assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), n


class LayerNormDtypes(TorchDispatchMode):
    """Records the dtypes of input, weight and output of every layer-norm kernel that runs."""
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.native_layer_norm.default:
            self.calls.append((args[0].dtype, args[2].dtype, out[0].dtype))
        return out


def _frozen_layer_norms(device="cpu"):
    g = torch.Generator().manual_seed(0)
    stock = torch.nn.LayerNorm(160)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(160, generator=g))
        stock.bias.copy_(torch.randn(160, generator=g))
    stock.requires_grad_(False).to(device)
    fast_norm = copy.deepcopy(stock)
    swap_class(fast_norm, "ComputeDtypeLayerNorm", forward=forwards.layer_norm_in_compute_dtype)
    x = (torch.randn(4, 49, 160, generator=g) * 3 + 1).to(device, torch.bfloat16)
    return stock, fast_norm, x


def test_tinyvit_layer_norm_runs_in_the_input_dtype():
    """A frozen TinyViT LayerNorm given bf16 runs one bf16 kernel (bf16 gamma; CUDA's autocast would
    run it in fp32, see the CUDA test below), and its gradient reaches the input. A norm that trains
    (SALT's) and an fp32 input take stock's path, bit for bit."""
    stock, fast_norm, x = _frozen_layer_norms()
    x.requires_grad_()
    with LayerNormDtypes() as seen:
        out = fast_norm(x)
    assert seen.calls == [(torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    expected = F.layer_norm(x.detach().float(), (160,), stock.weight, stock.bias, stock.eps)
    assert (out.float() - expected).abs().max() < 2 ** -7 * expected.abs().max()  # bf16 output, gamma, beta
    out.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    x32 = x.detach().float()
    assert torch.equal(fast_norm(x32), stock(x32))
    fast_norm.requires_grad_(True)
    stock.requires_grad_(True)
    with LayerNormDtypes() as seen:
        assert torch.equal(fast_norm(x.detach()), stock(x.detach()))  # a trainable norm: stock's own forward
    assert seen.calls[0][1] == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's autocast runs layer_norm in fp32; the CPU's does not")
def test_tinyvit_layer_norm_matches_cuda_autocast():
    """On CUDA under bf16 autocast, stock's norm returns fp32, which the next linear layer rounds to bf16;
    ours returns bf16 directly. They differ by the rounding of gamma and beta to bf16 at most."""
    stock, fast_norm, x = _frozen_layer_norms("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, out = stock(x), fast_norm(x)
    assert expected.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert (out.float() - expected.to(torch.bfloat16).float()).abs().max() < 2 ** -7 * expected.abs().max()


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_2d_one_kernel_matches_stock(channels_last):
    """LayerNorm2d as one layer-norm kernel over the channels-last view: stock's output and gradients (fp32),
    for a contiguous input and a channels-last one (the ViT neck's permuted tokens)."""
    from segment_anything.modeling.common import LayerNorm2d
    g = torch.Generator().manual_seed(0)
    stock = LayerNorm2d(24)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(24, generator=g))
        stock.bias.copy_(torch.randn(24, generator=g))
    fast_norm = copy.deepcopy(stock)
    model = make_fast(vit_encoder())
    model.norm = fast_norm  # use_fast_forwards swaps every LayerNorm2d of the model
    use_fast_forwards(model)
    assert type(fast_norm).__name__ == "OneKernelLayerNorm2d"
    x = torch.randn(2, 24, 5, 7, generator=g) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 24, 5, 7, generator=g)
    results = []
    for m in (stock, fast_norm):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(grad_out)
        results.append((out.detach(), xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)


def layer_norm_2d_kinds(model):
    return [type(m).__name__ for m in model.modules() if type(m).__name__.endswith("LayerNorm2d")]


def test_build_model_swaps_every_layer_norm_2d_unless_no_fast():
    """common.build_model hands the built model to the fast layer, which swaps every LayerNorm2d; with
    --no-fast (and in load_sam's model) they stay stock's."""
    for extra in ((), ("--no-fast",)):
        _, model = method_model("lora", extra)
        kinds = layer_norm_2d_kinds(model)
        assert len(kinds) == 5  # encoder neck 2, decoder upscaling 1, prompt encoder's mask downscaling 2
        assert set(kinds) == ({"LayerNorm2d"} if extra else {"OneKernelLayerNorm2d"})
    assert set(layer_norm_2d_kinds(tiny_model()[1])) == {"LayerNorm2d"}


def test_no_fast_builds_stock_segment_anything_and_trains_with_the_plain_step(tmp_path, monkeypatch):
    """--no-fast: no module of the built model has a forward of the fast layer, fast.apply and
    fast.training_step are never called, and train_loop's step is common.TrainStep. Without it, the fast
    layer is applied to the model and gives the training step."""
    calls = []
    apply, training_step = fast.apply, fast.training_step
    monkeypatch.setattr(fast, "apply", lambda *a: calls.append("apply") or apply(*a))
    monkeypatch.setattr(fast, "training_step", lambda *a: calls.append("training_step") or training_step(*a))
    steps = []
    train_step_call = common.TrainStep.__call__
    monkeypatch.setattr(common.TrainStep, "__call__", lambda self, *b: steps.append(type(self)) or train_step_call(self, *b))
    images, masks = torch.rand(2, 3, 128, 128), torch.randint(0, 2, (2, 128, 128), dtype=torch.uint8)
    for extra, expected in ((("--no-fast",), []), ((), ["apply", "training_step"])):
        calls.clear()
        steps.clear()
        args, model = method_model("lora", ("--steps", "1", *extra))
        kinds = {type(m).__module__ for m in model.modules()}
        assert (forwards.__name__ in kinds) == (not extra)
        common.train_loop(model, lambda: (images, masks), common.default_loss, args, torch.device("cpu"),
                          tmp_path / str(bool(extra)), 1)
        assert calls == expected and steps == [common.TrainStep]  # on the CPU the fast step is the plain one
        assert (common.fast_layer(args) is None) == bool(extra)


def test_1x1_conv_bn_as_matmul_matches_stock():
    """MobileSAM's Conv2d_BN folded: a 1x1 convolution of a channels-last image runs as a matmul over its
    pixels, other convolutions and layouts as F.conv2d; both give stock's conv + BatchNorm (eval, fp32)."""
    from mobile_sam.modeling.tiny_vit_sam import Conv2d_BN
    g = torch.Generator().manual_seed(0)
    for ks, groups, channels_last in ((1, 1, True), (1, 1, False), (3, 8, True)):
        stock = Conv2d_BN(8, 8 if groups > 1 else 16, ks, 1, ks // 2, groups=groups)
        with torch.no_grad():
            stock.c.weight.copy_(torch.randn(stock.c.weight.shape, generator=g))
            for t in (stock.bn.weight, stock.bn.bias, stock.bn.running_mean):
                t.copy_(torch.randn(t.shape, generator=g))
            stock.bn.running_var.copy_(torch.rand(stock.bn.running_var.shape, generator=g) + 0.5)
        stock.eval()
        fast_conv = copy.deepcopy(stock)
        swap_class(fast_conv, "FoldedConv2d_BN", forward=forwards.folded_conv_bn)
        x = torch.randn(2, 8, 6, 6, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with LinearCalls() as seen:
            out = fast_conv(x)
        assert seen.linear == (ks == 1 and channels_last)
        assert torch.allclose(out, stock(x), rtol=1e-4, atol=1e-4)


class LinearCalls(TorchDispatchMode):
    """Whether a matmul (F.linear: addmm / mm) or a convolution ran."""
    def __init__(self):
        super().__init__()
        self.linear = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
            self.linear = True
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel,stride", [(16, 16), (16, 8)])  # SAM's, and one that is not a patching
def test_patch_embed_as_matmul_matches_stock(kernel, stride):
    """SAM ViT's patch embedding as a matmul over patches equals its convolution, forward and backward
    (image and weight), in fp32; a convolution whose stride is not its kernel runs as stock. The fast layer
    applies it to ViTs built by common.build_model."""
    from segment_anything.modeling.image_encoder import PatchEmbed
    torch.manual_seed(0)
    stock = PatchEmbed(kernel_size=(kernel, kernel), stride=(stride, stride), in_chans=3, embed_dim=64)
    fast_embed = copy.deepcopy(stock)
    make_fast(vit_encoder(patch_embed=fast_embed))
    assert type(fast_embed).__name__ == "MatmulPatchEmbed"
    x = torch.randn(2, 3, 64, 48, requires_grad=True)
    g = torch.randn_like(stock(x))
    want = [stock(x), *torch.autograd.grad(stock(x), [x, stock.proj.weight, stock.proj.bias], g)]
    got = [fast_embed(x), *torch.autograd.grad(fast_embed(x), [x, fast_embed.proj.weight, fast_embed.proj.bias], g)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _, model = method_model("lora")
    assert type(model.image_encoder.patch_embed).__name__ == "MatmulPatchEmbed"


def test_first_block_input_requires_grad_and_gradients_stay(monkeypatch):
    """fast.step.configure_compilation hands the first ViT block an input that requires grad in training (so
    that its compiled graph is the other windowed blocks'); the adapter's gradients do not change, and under
    no_grad nothing does."""
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.triton, "autotune_pointwise",
                        torch._inductor.config.triton.autotune_pointwise)  # configure_compilation sets it
    args, stock = tiny_model()
    lora.inject(stock, rank=4)
    randomise(stock)
    shared = copy.deepcopy(stock)
    configure_compilation(shared)
    configure_compilation(shared)  # a second call adds no second hook
    assert len(shared.image_encoder.patch_embed._forward_hooks) == 1
    assert torch._inductor.config.triton.autotune_pointwise is False
    seen = []
    shared.image_encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    x = torch.rand(2, 3, args.img_size, args.img_size)
    masks = (torch.rand(2, args.img_size, args.img_size) < 0.2).to(torch.uint8)
    for m in (stock, shared):
        common.segmentation_loss(m(x), masks).backward()
    assert seen == [True]
    for (n, a), (_, b) in zip(stock.named_parameters(), shared.named_parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.equal(a.grad, b.grad), n
    with torch.no_grad():
        shared(x)
    assert seen == [True, False]


def test_run_compiles_the_blocks_before_training_only_where_it_compiles(tmp_path, monkeypatch):
    """cli.run compiles the encoder blocks (common.compile_blocks) before training where should_compile
    says so (on the CPU it does not compile, so compilation is faked here), and not otherwise."""
    train_loop = common.train_loop
    calls = []

    def recording_train_loop(*args, **kwargs):
        calls.append("train")
        return train_loop(*args, **kwargs)
    for compiling in (True, False):
        calls.clear()
        for module in (common, cli):  # cli.run calls the names it imported from common
            monkeypatch.setattr(module, "should_compile", lambda args, device: compiling)
        monkeypatch.setattr(cli, "compile_blocks", lambda model: calls.append("compile"))
        monkeypatch.setattr(cli, "train_loop", recording_train_loop)
        lora.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path),
                   "--synthetic-train", "2", "--synthetic-test", "1", "--run-name", f"compile_{compiling}"])
        assert calls == (["compile", "train"] if compiling else ["train"])


def tokenwise_in_fact(qkv, seed=0):
    """Whether qkv (a ViT attention's, on (B, H, W, C) tokens) maps each token alone, moving one token leaving
    the others' output, and a zero token to its bias: what fast.forwards.is_tokenwise must say of it."""
    x = torch.randn(1, 4, 4, qkv.in_features, generator=torch.Generator().manual_seed(seed))
    moved = x.clone()
    moved[0, 0, 0] += 1.0
    with torch.no_grad():
        others_kept = torch.allclose(qkv(x).flatten(1, 2)[:, 1:], qkv(moved).flatten(1, 2)[:, 1:])
        zero_gives_bias = torch.allclose(qkv(torch.zeros(1, 1, 1, qkv.in_features)).flatten(), qkv.bias)
    return others_kept and zero_gives_bias


QKV_ADAPTERS = {  # a qkv 32 -> 96 wrapped by each method's adapter (as in its initial state)
    "linear": lambda q: q,
    "lora": lambda q: lora.LoRAQKV(q, 4),
    "balr_sam": lambda q: importlib.import_module("balr_sam").LoRAQKV(q, 4),
    "salt": lambda q: importlib.import_module("salt").SALTLinear(q, 8, 4),
    "atrous_lora": lambda q: importlib.import_module("atrous_lora").AtrousLoRAQKV(q, 4, (1, 2)),
    "samora": lambda q: importlib.import_module("samora").SAMoraQKV(q, 4, None, 8, 2),  # stage "fused"
}


@pytest.mark.parametrize("adapter", list(QKV_ADAPTERS))
def test_is_tokenwise_says_what_the_qkv_does(adapter):
    """fast.forwards.is_tokenwise lets a windowed ViT block skip stock's window padding (vit_block): it must
    hold exactly when the qkv maps each token alone (moving one token leaves the others' output) and a zero
    token to its bias (the padding's k and v). nn.Linear, LoRA and SALT do; AtrousLoRA's convolutions and
    SAMora's HL-Attn fusion (its initial stage) break both. SAMora's single experts: test_samora. The probe
    works on a copy: the module is left as it was."""
    torch.manual_seed(0)
    qkv = QKV_ADAPTERS[adapter](nn.Linear(32, 96))
    if adapter == "samora":
        assert qkv.active == "fused"
    for name, p in qkv.named_parameters():
        if name not in ("weight", "bias"):  # adapters start as the identity update, which would hide them
            p.data.copy_(torch.randn(p.shape) * 0.5)
    before = copy.deepcopy(qkv.state_dict())
    assert forwards.is_tokenwise(qkv, 4) == tokenwise_in_fact(qkv) == (adapter not in ("atrous_lora", "samora"))
    assert all(torch.equal(v, qkv.state_dict()[k]) for k, v in before.items())


def test_is_tokenwise_finds_an_adapter_that_starts_as_the_identity():
    """is_tokenwise randomises the trainable parameters of its probe: an AtrousLoRA qkv fresh from inject
    (B = 0, so it is nn.Linear's function at step 0) still says False, and a fresh LoRA one True."""
    import atrous_lora
    torch.manual_seed(0)
    qkv = nn.Linear(32, 96).requires_grad_(False)
    assert forwards.is_tokenwise(atrous_lora.AtrousLoRAQKV(qkv, 4, (1, 2)), 4) is False
    assert forwards.is_tokenwise(lora.LoRAQKV(qkv, 4), 4) is True


def randomised_lora(qkv):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in qkv.named_parameters():
            if "lora_" in name:  # B non-zero: a fused update that dropped a path would show
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return qkv


@pytest.mark.parametrize("method", ["lora", "balr_sam"])
@pytest.mark.parametrize("encoder", ["vit", "tinyvit"])
def test_lora_layout_recognises_lora_qkv_and_the_fused_forward_is_its_own(method, encoder):
    """fast.forwards.lora_layout recognises lora.py's and balr_sam.py's LoRAQKV by trying it: layout None
    ([q | k | v]) in SAM ViT's attention, the head count in TinyViT's (per head [q_h | k_h | v_h]); the fused
    forward (fused_lora_qkv: [A_q; A_v] x, then one matmul with the update) then equals the module's own
    forward with random non-zero B, and so do the gradients of the input, the LoRA weights and the bias
    (the frozen weight gets none, as in every method)."""
    mod = importlib.import_module(method)
    torch.manual_seed(0)
    if encoder == "vit":
        from segment_anything.modeling.image_encoder import Attention
        attn, heads, x = Attention(64, num_heads=2, qkv_bias=True), None, torch.randn(2, 4, 4, 64)
    else:
        from mobile_sam.modeling.tiny_vit_sam import Attention
        attn = Attention(dim=64, key_dim=16, num_heads=4, attn_ratio=1, resolution=(7, 7))
        heads, x = 4, torch.randn(3, 49, 64)  # (B*nW, 7*7, C)
    qkv = randomised_lora(mod.LoRAQKV(attn.qkv, 4, heads))
    qkv.weight.requires_grad_(False)
    assert forwards.lora_layout(qkv, heads) == (True, heads)
    fused = copy.deepcopy(qkv)
    swap_class(fused, "Fused" + type(qkv).__name__, forward=forwards.fused_lora_qkv)
    fused.fused_heads = heads
    x.requires_grad_()
    want, got = qkv(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    trained = lambda m: [p for p in m.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(got, [x, *trained(fused)], g), torch.autograd.grad(want, [x, *trained(qkv)], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and use_fast_forwards fuses it in a model's attention
    fast_attn = copy.deepcopy(attn)
    fast_attn.qkv = copy.deepcopy(qkv)
    make_fast(vit_encoder(attn_block(fast_attn)) if encoder == "vit" else tinyvit_encoder(fast_attn))
    assert type(fast_attn.qkv).__name__ == "Fused" + type(qkv).__name__ and fast_attn.qkv.fused_heads == heads


def test_lora_layout_refuses_what_is_not_a_lora_qkv():
    """AtrousLoRA (its AAM between A and B), SALT, SAMora and a plain linear layer are not fused."""
    import atrous_lora
    import salt
    import samora
    torch.manual_seed(0)
    for qkv in (atrous_lora.AtrousLoRAQKV(nn.Linear(32, 96), 4, (1, 2)), salt.SALTLinear(nn.Linear(32, 96), 8, 4),
                samora.SAMoraQKV(nn.Linear(32, 96), 4, None, 8, 2), nn.Linear(32, 96)):
        assert forwards.lora_layout(qkv, None) == (False, None), type(qkv).__name__
    stock = vit_attention(4)
    stock.qkv = atrous_lora.AtrousLoRAQKV(stock.qkv, 4, (1, 2))
    fast_attn = fast_copy(stock)
    assert type(fast_attn.qkv) is atrous_lora.AtrousLoRAQKV and not fast_attn.qkv_tokenwise


def test_grad_checkpointing_gives_the_same_gradients():
    """common.use_grad_checkpointing (--grad-checkpoint) on the fast forwards: the same gradients, the
    blocks' forward run again in the backward pass (recomputed), and in evaluation the plain forward."""
    args, stock = tiny_model()
    lora.inject(stock, rank=4)
    randomise(stock)
    use_fast_forwards(stock)
    ckpt = copy.deepcopy(stock)
    common.use_grad_checkpointing(ckpt.image_encoder)
    runs = {id(m): 0 for m in (stock, ckpt)}
    for m in (stock, ckpt):
        for blk in m.image_encoder.blocks:
            blk.attn.register_forward_hook(lambda mod, a, out, key=id(m): runs.__setitem__(key, runs[key] + 1))
    x = torch.rand(2, 3, args.img_size, args.img_size)
    masks = (torch.rand(2, args.img_size, args.img_size) < 0.2).to(torch.uint8)
    for m in (stock, ckpt):
        common.segmentation_loss(m(x), masks).backward()
    assert runs[id(stock)] == 2 and runs[id(ckpt)] == 4  # two blocks, each recomputed once under checkpointing
    for (n, a), (_, b) in zip(stock.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None or b.grad is not None:  # the decoder's IoU head gets none
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n
    ckpt.eval()  # and in evaluation nothing is recomputed: the output is the plain forward's
    with torch.no_grad():
        assert torch.equal(ckpt(x), stock.eval()(x))


@pytest.mark.parametrize("extra", [(), ("--no-fast",)])
def test_grad_checkpoint_flag_gives_the_same_gradients(extra):
    """--grad-checkpoint in common.build_model (and, with the fast layer, fast.apply's selective policy):
    the same gradients as the model built without it."""
    grads = []
    for flags in ((), ("--grad-checkpoint",)):
        torch.manual_seed(0)
        args, model = method_model("lora", (*extra, *flags))
        assert all(isinstance(blk.forward, functools.partial) == bool(flags) for blk in model.image_encoder.blocks)
        randomise(model)
        x = torch.rand(2, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
        masks = (torch.rand(2, args.img_size, args.img_size, generator=torch.Generator().manual_seed(2)) < 0.2)
        model.train()
        common.segmentation_loss(model(x), masks.to(torch.uint8)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_" in n for n in grads[0])
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-5, atol=1e-7), n


def _train_steps(method, graphed, batches, device, compiled=False):
    """A tiny SAM with `method`'s adapter and the fast forwards, trained on `batches` by common.TrainStep
    or (graphed) fast.step.GraphedStep; returns its trainable parameters and the losses."""
    mod = importlib.import_module(method)
    args = mod.parse_args(["--model", "tiny", "--device", device.type])
    model = common.load_sam(args, cli.setup(args, method, gpu_steps=10))
    torch.manual_seed(0)
    INJECT[method](mod, model, args)
    use_fast_forwards(model)
    model.to(device).train()
    if compiled:
        common.compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=device.type == "cuda")
    step = (GraphedStep if graphed else common.TrainStep)(model, common.default_loss, optimizer, device)
    losses = [step(*batch).float().item() for batch in batches]
    return [p.detach().float().cpu() for p in params], losses


def fp32_steps(monkeypatch):
    """The steps in fp32: bf16 rounding noise would be amplified by Adam's normalisation on near-zero
    gradients (common.TrainStep and GraphedStep both take common.autocast)."""
    monkeypatch.setattr(common, "autocast", lambda device: torch.autocast(device.type, enabled=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "atrous_lora"])
def test_graphed_training_steps_match_eager_ones(method, monkeypatch):
    """Six steps (three eager warm-up steps, the capture, two replays) on new batches each: the same losses
    and the same trained parameters as six eager steps. Each replay must read its new batch and the
    weights the previous step wrote. fp32; tolerance for cuDNN's choice of algorithms and atomic-add order."""
    fp32_steps(monkeypatch)
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.rand(2, 3, 128, 128, device=device, generator=g),
                torch.randint(0, 2, (2, 128, 128), device=device, generator=g, dtype=torch.uint8)) for _ in range(6)]
    eager_params, eager_losses = _train_steps(method, False, batches, device)
    graph_params, graph_losses = _train_steps(method, True, batches, device)
    assert len(set(graph_losses)) == 6, graph_losses  # every step saw its own batch
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3), (graph_losses, eager_losses)
    for a, b in zip(eager_params, graph_params):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (a - b).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cli.run compiles on CUDA only")
def test_compiled_training_steps_match_eager_ones(monkeypatch):
    """compile_blocks's blocks train as the uncompiled ones do: three steps, the same losses and trained
    parameters in fp32, within the tolerance of inductor's fused reductions."""
    fp32_steps(monkeypatch)
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.rand(2, 3, 128, 128, device=device, generator=g),
                torch.randint(0, 2, (2, 128, 128), device=device, generator=g, dtype=torch.uint8)) for _ in range(3)]
    eager_params, eager_losses = _train_steps("lora", False, batches, device)
    compiled_params, compiled_losses = _train_steps("lora", False, batches, device, compiled=True)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-3), (compiled_losses, eager_losses)
    for a, b in zip(eager_params, compiled_params):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (a - b).abs().max()


def test_train_step_runs_eagerly_where_it_cannot_capture():
    """On the CPU the fast layer's step (fast.training_step) is common.TrainStep, the plain step: its loss
    equals the loss computed by hand before the update, and the update happens."""
    args, model = tiny_model()
    lora.inject(model, 4)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    images, masks = torch.rand(2, 3, 128, 128), torch.randint(0, 2, (2, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        expected = common.default_loss(model, images, masks)
    step = fast.training_step(model, common.default_loss, torch.optim.AdamW(params, lr=1e-3), torch.device("cpu"))
    assert type(step) is common.TrainStep
    assert torch.allclose(step(images, masks), expected)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("method", METHODS)
def test_frozen_weights_to_bf16_casts_only_frozen_base_weights(method):
    """What the cast touches: frozen base weights of linear and convolution layers (LoRA's wrapped qkv
    included); never a trainable parameter, an adapter entry (so checkpoints stay fp32), a norm, or the
    weight of a layer that trains parameters of its own (SALT rebuilds W + delta from it)."""
    args, model = method_model(method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_weights_to_bf16(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    cast = {n for n, d in dtypes.items() if d == torch.bfloat16}
    assert cast, "nothing was cast"
    assert not cast & trainable
    assert cast <= model.base_keys
    assert all(v.dtype != torch.bfloat16 for v in common.adapter_state(model).values())
    assert not any("norm" in n or "rel_pos" in n for n in cast)
    if method == "salt":
        assert not any(n.endswith("attn.qkv.weight") for n in cast)  # SALTLinear: W + delta, W stays fp32
    else:
        assert "image_encoder.blocks.0.attn.qkv.weight" in cast  # the adapter's wrapped, frozen qkv
    if method == "lora":
        assert "image_encoder.blocks.0.mlp.lin1.weight" in cast and "image_encoder.patch_embed.proj.weight" in cast


def test_training_refuses_a_trainable_bf16_weight(tmp_path):
    """A stage that unfreezes a weight after the cast would train it in bf16: the fast layer's training step
    (train_loop asks for it) says so instead."""
    args, model = method_model("lora")
    frozen_weights_to_bf16(model)
    model.image_encoder.blocks[0].mlp.lin1.weight.requires_grad_(True)
    with pytest.raises(common.UserError, match="not float32"):
        common.train_loop(model, lambda: None, common.default_loss, args, torch.device("cpu"), tmp_path, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast runs on CUDA")
@pytest.mark.parametrize("method", ["lora", "salt"])
def test_bf16_frozen_weights_give_what_autocast_gave(method):
    """Under bf16 autocast the stored bf16 weights are the values autocast made from the fp32 ones, so the
    forward is unchanged: bit for bit where every cast weight feeds a linear or convolution as it is."""
    args, model = method_model(method)
    model = model.cuda().eval()
    x = torch.rand(2, 3, args.img_size, args.img_size, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        before = model(x)
        frozen_weights_to_bf16(model)
        after = model(x)
    assert torch.equal(before, after), (before - after).abs().max()


@pytest.mark.parametrize("capability,triton", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpus_older_than_triton_supports_run_uncompiled_without_the_kernels(monkeypatch, capability, triton):
    """A GPU of compute capability below 8.0 (a T4, an RTX 20xx, a V100: Triton cannot assemble bf16 code for
    them) gets neither torch.compile nor the Triton attention kernels; 8.0 and newer get both. The CUDA
    queries are faked: the decisions are what is checked."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(forwards, "_RELPOS", None)
    args = SimpleNamespace(device="auto", no_compile=False, model="vit_b")
    device = cli.pick_device(args)
    assert device.type == "cuda"
    assert common.should_compile(args, device) == triton
    if not triton:
        assert forwards.relpos_kernels() is None
    elif importlib.util.find_spec("triton") is not None:
        assert forwards.relpos_kernels() is not None

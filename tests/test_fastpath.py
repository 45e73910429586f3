"""The fast path of common.py: attention through scaled_dot_product_attention with the decomposed rel-pos
term folded into q and k must give stock SAM's attention (fp32, tolerances stated per test), with and
without LoRA, forward and backward; activation checkpointing must give the same gradients."""
import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import common
import lora
from common import use_fast_attention, use_grad_checkpointing

TOL = 1e-5  # max |fast - stock| of one attention in fp32; measured ~1e-6 (exactly 0 where SDPA's math path runs)


def tiny_model(extra=()):
    args = lora.parse_args(["--model", "tiny", "--device", "cpu", *extra])
    device = common.setup(args, "lora", gpu_steps=10)
    return args, common.load_sam(args, device)


def randomise(module, seed=0):
    """Non-zero rel-pos tables (SAM initialises them at zero, which would hide a wrong rel-pos term) and
    non-zero LoRA B (zero at init, which would hide a LoRA path that the fast forward skipped)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "rel_pos" in name or "lora_B" in name or "attention_biases" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)


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
    fast = copy.deepcopy(module)
    use_fast_attention(SimpleNamespace(blocks=[SimpleNamespace(attn=fast)]))  # as a ViT's blocks[i].attn
    assert type(fast).__name__ == "FastAttention" and isinstance(fast, type(module))
    return fast


@pytest.mark.parametrize("side", [14, 16])  # a ViT-B window (14 x 14), a global grid (16 x 16)
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_attention_forward_and_backward_match_stock(side, lora_rank):
    stock = vit_attention(side, lora_rank)
    fast = fast_copy(stock)
    x = torch.randn(3, side, side, 128, requires_grad=True)
    y_stock = stock(x)
    y_fast = fast(x)
    assert (y_fast - y_stock).abs().max() < TOL
    g = torch.randn_like(y_stock)
    gx_stock, *gp_stock = torch.autograd.grad(y_stock, [x, *stock.parameters()], g)
    gx_fast, *gp_fast = torch.autograd.grad(y_fast, [x, *fast.parameters()], g)
    assert (gx_fast - gx_stock).abs().max() < TOL * max(1.0, gx_stock.abs().max().item())
    for a, b in zip(gp_fast, gp_stock):  # rel-pos tables and LoRA paths get the stock gradients
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("pad_v", [True, False])
def test_value_padding_does_not_change_the_result(pad_v):
    stock = vit_attention(14)
    fast = fast_copy(stock)
    fast.fast_pad_v = pad_v
    x = torch.randn(2, 14, 14, 128)
    with torch.no_grad():
        assert (fast(x) - stock(x)).abs().max() < TOL


def test_rel_pos_table_of_another_size_is_resized_as_stock():
    """A global block whose table was made for another grid: stock interpolates it on the fly."""
    stock = vit_attention(16)
    fast = fast_copy(stock)
    x = torch.randn(1, 12, 12, 128)  # 12 x 12 tokens, table for 16 x 16 (31 rows, 23 wanted)
    with torch.no_grad():
        assert (fast(x) - stock(x)).abs().max() < TOL


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
    fast = fast_copy(stock)
    x = torch.randn(B, side, side, 128)
    N = side * side
    with torch.no_grad():
        with LargestTensor() as seen_stock:
            stock(x)
        with LargestTensor() as seen_fast:
            fast(x)
    assert seen_stock.largest >= B * heads * N * N  # stock builds (B*heads, N, N) logits
    assert seen_fast.largest < B * heads * N * N / 4  # fast: at most (B, N, 3C) or (B, heads, N, 128)


@pytest.mark.parametrize("img_size", [128, 160])  # 160: a 10 x 10 grid, padded to 12 x 12 for 4 x 4 windows
def test_tiny_sam_with_lora_matches_stock(img_size):
    """The whole fast path (load_sam's, use_fast_path) against stock SAM (--stock-attention), fp32."""
    args, stock = tiny_model(["--img-size", str(img_size), "--stock-attention"])
    lora.inject(stock, rank=4)
    randomise(stock)
    fast = copy.deepcopy(stock)
    common.use_fast_path(fast)
    assert all(type(a).__name__ == "FastAttention" for a, _ in common.encoder_attentions(fast.image_encoder))
    assert {"FastDecoderAttention", "OneKernelLayerNorm2d"} <= {type(m).__name__ for m in fast.modules()}
    assert not {"FastDecoderAttention", "FastAttention"} & {type(m).__name__ for m in stock.modules()}
    assert set(fast.state_dict()) == set(stock.state_dict())  # same keys: checkpoints load either way
    x = torch.rand(2, 3, img_size, img_size)
    masks = (torch.rand(2, img_size, img_size) < 0.2).to(torch.uint8)
    out_stock, out_fast = stock(x), fast(x)
    assert (out_fast - out_stock).abs().max() < 1e-4 * out_stock.abs().max()  # through 2 blocks + decoder
    common.segmentation_loss(out_stock, masks).backward()
    common.segmentation_loss(out_fast, masks).backward()
    grads = {n: p.grad for n, p in stock.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads.values())
    for n, p in fast.named_parameters():
        if n in grads:
            assert (p.grad - grads[n]).abs().max() < 1e-4 * grads[n].abs().max(), n


@pytest.mark.parametrize("downsample,query_batch", [(1, 3), (2, 1)])  # self-attention; tokens at batch 1
def test_decoder_attention_matches_stock(downsample, query_batch):
    """The mask decoder's attention through SDPA (common.fast_decoder_attention) against stock's, fp32,
    forward and backward, with 5 tokens attending to 64 image tokens of 3 images (at batch 1 beside the
    3 images, as prompt-free decoding passes them) and the other way round."""
    from segment_anything.modeling.transformer import Attention
    torch.manual_seed(0)
    stock = Attention(32, num_heads=2, downsample_rate=downsample)
    fast = copy.deepcopy(stock)
    common._swap_class(fast, "FastDecoderAttention", forward=common.fast_decoder_attention)
    tokens = torch.randn(query_batch, 5, 32, requires_grad=True)
    image = torch.randn(3, 64, 32, requires_grad=True)
    for q, kv in ((tokens, image), (image, tokens)):
        outs, grads = [], []
        for m in (stock, fast):
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


def test_fast_attention_is_idempotent_and_survives_a_later_lora():
    args, model = tiny_model()
    use_fast_attention(model.image_encoder)
    use_fast_attention(model.image_encoder)  # a second call changes nothing
    classes = {type(a) for a, _ in common.encoder_attentions(model.image_encoder)}
    assert len(classes) == 1 and next(iter(classes)).__bases__[0].__name__ == "Attention"
    stock = copy.deepcopy(model)
    for a, _ in common.encoder_attentions(stock.image_encoder):
        a.__class__ = type(a).__bases__[0]
    for m in (model, stock):  # LoRA after the swap: the fast forward must still call attn.qkv
        torch.manual_seed(2)  # the same LoRA A in both
        lora.inject(m, rank=2)
        randomise(m, seed=3)
    x = torch.rand(1, 3, args.img_size, args.img_size)
    with torch.no_grad():
        assert (model(x) - stock(x)).abs().max() < 1e-4 * stock(x).abs().max()


@pytest.mark.parametrize("training", [True, False])  # stock TinyViT uses a cached bias in eval mode
def test_tinyvit_attention_matches_stock(training):
    from mobile_sam.modeling.tiny_vit_sam import Attention
    stock = Attention(dim=64, key_dim=32, num_heads=2, attn_ratio=1, resolution=(7, 7))
    stock.qkv = lora.LoRAQKV(stock.qkv, rank=2, heads=2)
    randomise(stock)
    stock.train(training)
    fast = copy.deepcopy(stock)
    # as TinyViT's layers[1:][j].blocks[i].attn (layers[0] is convolutional)
    use_fast_attention(SimpleNamespace(layers=[None, SimpleNamespace(blocks=[SimpleNamespace(attn=fast)])]))
    assert type(fast).__name__ == "FastTinyViTAttention"
    x = torch.randn(4, 49, 64)  # (B*nW, 7*7, C)
    with torch.no_grad():
        assert (fast(x) - stock(x)).abs().max() < TOL


def test_mobile_sam_fast_path_matches_stock():
    """The whole MobileSAM encoder with LoRA, fp32: fast attention, folded BatchNorms and channels-last
    convolutions give stock's logits and stock's LoRA gradients. BatchNorm statistics are randomised
    (the pretrained ones would hide a fold that ignored them)."""
    args = lora.parse_args(["--model", "mobile_sam", "--device", "cpu", "--stock-attention"])
    device = common.setup(args, "lora", gpu_steps=10)
    stock = common.load_sam(args, device)
    lora.inject(stock, rank=4)
    randomise(stock)
    g = torch.Generator().manual_seed(1)
    for m in stock.image_encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    fast = copy.deepcopy(stock)
    use_fast_attention(fast.image_encoder)
    kinds = {type(m).__name__ for m in fast.image_encoder.modules()}
    assert {"FastTinyViTBlock", "FoldedConv2d_BN", "ChannelsLastPatchEmbed", "FastTinyViTAttention",
            "ComputeDtypeLayerNorm"} <= kinds
    x = torch.rand(1, 3, 1024, 1024, generator=g)
    masks = (torch.rand(1, 1024, 1024, generator=g) < 0.2).to(torch.uint8)
    logits = []
    for m in (stock, fast):
        m.train()
        out = m(x)
        common.segmentation_loss(out, masks).backward()
        logits.append(out.detach())
    assert (logits[0] - logits[1]).abs().max() < 1e-4 * logits[0].abs().max()
    for (n, a), (_, b) in zip(stock.named_parameters(), fast.named_parameters()):
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
    fast = copy.deepcopy(stock)
    common._swap_class(fast, "ComputeDtypeLayerNorm", forward=common.layer_norm_in_compute_dtype)
    x = (torch.randn(4, 49, 160, generator=g) * 3 + 1).to(device, torch.bfloat16)
    return stock, fast, x


def test_tinyvit_layer_norm_runs_in_the_input_dtype():
    """A frozen TinyViT LayerNorm given bf16 runs one bf16 kernel (bf16 gamma; CUDA's autocast would
    run it in fp32, see the CUDA test below), and its gradient reaches the input. A norm that trains
    (SALT's) and an fp32 input take stock's path, bit for bit."""
    stock, fast, x = _frozen_layer_norms()
    x.requires_grad_()
    with LayerNormDtypes() as seen:
        out = fast(x)
    assert seen.calls == [(torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    expected = F.layer_norm(x.detach().float(), (160,), stock.weight, stock.bias, stock.eps)
    assert (out.float() - expected).abs().max() < 2 ** -7 * expected.abs().max()  # bf16 output, gamma, beta
    out.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    x32 = x.detach().float()
    assert torch.equal(fast(x32), stock(x32))
    fast.requires_grad_(True)
    stock.requires_grad_(True)
    with LayerNormDtypes() as seen:
        assert torch.equal(fast(x.detach()), stock(x.detach()))  # a trainable norm: stock's own forward
    assert seen.calls[0][1] == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's autocast runs layer_norm in fp32; the CPU's does not")
def test_tinyvit_layer_norm_matches_cuda_autocast():
    """On CUDA under bf16 autocast, stock's norm returns fp32, which the next linear layer rounds to bf16;
    ours returns bf16 directly. They differ by the rounding of gamma and beta to bf16 at most."""
    stock, fast, x = _frozen_layer_norms("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, out = stock(x), fast(x)
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
    fast = copy.deepcopy(stock)
    common.use_one_kernel_layer_norm_2d(torch.nn.Sequential(fast))
    assert type(fast).__name__ == "OneKernelLayerNorm2d"
    x = torch.randn(2, 24, 5, 7, generator=g) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 24, 5, 7, generator=g)
    results = []
    for m in (stock, fast):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(grad_out)
        results.append((out.detach(), xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)


def test_load_sam_swaps_every_layer_norm_2d_unless_stock():
    for extra in ((), ("--stock-attention",)):
        _, model = tiny_model(extra)
        kinds = [type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Module)
                 and type(m).__name__.endswith("LayerNorm2d")]
        assert len(kinds) == 5  # encoder neck 2, decoder upscaling 1, prompt encoder's mask downscaling 2
        assert set(kinds) == ({"LayerNorm2d"} if extra else {"OneKernelLayerNorm2d"})


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
        fast = copy.deepcopy(stock)
        common._swap_class(fast, "FoldedConv2d_BN", forward=common.folded_conv_bn)
        x = torch.randn(2, 8, 6, 6, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with LinearCalls() as seen:
            out = fast(x)
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
    (image and weight), in fp32; a convolution whose stride is not its kernel runs as stock. load_sam
    applies it to ViTs."""
    from segment_anything.modeling.image_encoder import PatchEmbed
    torch.manual_seed(0)
    stock = PatchEmbed(kernel_size=(kernel, kernel), stride=(stride, stride), in_chans=3, embed_dim=64)
    fast = copy.deepcopy(stock)
    common.use_fast_attention(SimpleNamespace(patch_embed=fast, blocks=[]))
    assert type(fast).__name__ == "MatmulPatchEmbed"
    x = torch.randn(2, 3, 64, 48, requires_grad=True)
    g = torch.randn_like(stock(x))
    want = [stock(x), *torch.autograd.grad(stock(x), [x, stock.proj.weight, stock.proj.bias], g)]
    got = [fast(x), *torch.autograd.grad(fast(x), [x, fast.proj.weight, fast.proj.bias], g)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _, model = tiny_model()
    assert type(model.image_encoder.patch_embed).__name__ == "MatmulPatchEmbed"


def test_first_block_input_requires_grad_and_gradients_stay():
    """share_first_block_graph hands the first ViT block an input that requires grad in training (so that
    its compiled graph is the other windowed blocks'); the adapter's gradients do not change, and under
    no_grad nothing does."""
    args, stock = tiny_model()
    lora.inject(stock, rank=4)
    randomise(stock)
    shared = copy.deepcopy(stock)
    common.share_first_block_graph(shared.image_encoder)
    common.share_first_block_graph(shared.image_encoder)  # a second call adds no second hook
    assert len(shared.image_encoder.patch_embed._forward_hooks) == 1
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


def test_compile_workers_are_released_after_training_when_compiling(tmp_path, monkeypatch):
    """common.run shuts the compile workers down once training is over, where it compiled (on the CPU it
    does not compile, so compilation is faked here), and not otherwise."""
    train_loop = common.train_loop
    calls = []

    def recording_train_loop(*args, **kwargs):
        calls.append("train")
        return train_loop(*args, **kwargs)
    for compiling in (True, False):
        calls.clear()
        monkeypatch.setattr(common, "should_compile", lambda args, device: compiling)
        monkeypatch.setattr(common, "compile_model", lambda model: calls.append("compile"))
        monkeypatch.setattr(common, "train_loop", recording_train_loop)
        monkeypatch.setattr(common, "release_compile_workers", lambda: calls.append("release"))
        lora.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path),
                   "--run-name", f"release_{compiling}"])
        assert calls == (["compile", "train", "release"] if compiling else ["train"])


def test_release_compile_workers_shuts_them_down_in_another_thread(monkeypatch):
    import threading
    import torch._inductor.async_compile as async_compile
    seen = []
    monkeypatch.setattr(async_compile, "shutdown_compile_workers",
                        lambda: seen.append(threading.current_thread().name))
    common.release_compile_workers()
    for t in threading.enumerate():
        if t.name == "release-compile-workers":
            t.join()
    assert seen == ["release-compile-workers"]


def tokenwise_in_fact(qkv, seed=0):
    """Whether qkv (a ViT attention's, on (B, H, W, C) tokens) maps each token alone, moving one token leaving
    the others' output, and a zero token to its bias: what common.tokenwise must say of it."""
    x = torch.randn(1, 4, 4, qkv.in_features, generator=torch.Generator().manual_seed(seed))
    moved = x.clone()
    moved[0, 0, 0] += 1.0
    with torch.no_grad():
        others_kept = torch.allclose(qkv(x).flatten(1, 2)[:, 1:], qkv(moved).flatten(1, 2)[:, 1:])
        zero_gives_bias = torch.allclose(qkv(torch.zeros(1, 1, 1, qkv.in_features)).flatten(), qkv.bias)
    return others_kept and zero_gives_bias


@pytest.mark.parametrize("adapter", ["linear", "lora", "balr_sam", "salt", "atrous_lora"])
def test_tokenwise_says_what_the_qkv_does(adapter):
    """common.tokenwise lets a windowed ViT block skip stock's window padding (fast_vit_block): it must hold
    exactly when the qkv maps each token alone (moving one token leaves the others' output) and a zero token
    to its bias (the padding's k and v). AtrousLoRA's convolutions break both. SAMora: test_samora."""
    import atrous_lora
    import balr_sam
    import salt
    torch.manual_seed(0)
    qkv = torch.nn.Linear(32, 96)
    qkv = dict(linear=lambda q: q, lora=lambda q: lora.LoRAQKV(q, 4), balr_sam=lambda q: balr_sam.LoRAQKV(q, 4),
               salt=lambda q: salt.SALTLinear(q, 8, 4),
               atrous_lora=lambda q: atrous_lora.AtrousLoRAQKV(q, 4, (1, 2)))[adapter](qkv)
    for name, p in qkv.named_parameters():
        if name not in ("weight", "bias"):  # adapters start as the identity update, which would hide them
            p.data.copy_(torch.randn(p.shape) * 0.5)
    assert common.tokenwise(qkv) == tokenwise_in_fact(qkv) == (adapter != "atrous_lora")


def test_grad_checkpointing_gives_the_same_gradients():
    args, stock = tiny_model()
    lora.inject(stock, rank=4)
    randomise(stock)
    ckpt = copy.deepcopy(stock)
    use_fast_attention(stock.image_encoder)
    use_fast_attention(ckpt.image_encoder)
    use_grad_checkpointing(ckpt.image_encoder)
    assert all(type(b).__name__ == "CheckpointedFastBlock" for b in ckpt.image_encoder.blocks)
    x = torch.rand(2, 3, args.img_size, args.img_size)
    masks = (torch.rand(2, args.img_size, args.img_size) < 0.2).to(torch.uint8)
    for m in (stock, ckpt):
        common.segmentation_loss(m(x), masks).backward()
    for (n, a), (_, b) in zip(stock.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None or b.grad is not None:  # the decoder's IoU head gets none
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n
    ckpt.eval()  # and in evaluation nothing is recomputed: the output is the plain forward's
    with torch.no_grad():
        assert torch.equal(ckpt(x), stock.eval()(x))


def _train_steps(method, graphed, batches, device, compiled=False):
    """A tiny SAM with `method`'s adapter trained on `batches` by common.TrainStep; returns its trainable
    parameters and the losses."""
    import importlib
    mod = importlib.import_module(method)
    args, model = tiny_model(["--device", device.type])
    torch.manual_seed(0)
    if method == "atrous_lora":
        mod.inject(model, 4, (1, 2))
    else:
        mod.inject(model, 4)
    model.to(device).train()
    if compiled:
        common.compile_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = common.make_optimizer(params, 1e-3, 0.01, device, graphed)
    step = common.TrainStep(model, common.default_loss, optimizer, device, graphed, amp=False)
    losses = [step(*batch).float().item() for batch in batches]
    return [p.detach().float().cpu() for p in params], losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "atrous_lora"])
def test_graphed_training_steps_match_eager_ones(method):
    """Six steps (three eager warm-up steps, the capture, two replays) on new batches each: the same losses
    and the same trained parameters as six eager steps. Each replay must read its new batch and the
    weights the previous step wrote. fp32 (bf16 rounding noise would be amplified by Adam's normalisation
    on near-zero gradients); tolerance for cuDNN's choice of algorithms and atomic-add order."""
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="common.run compiles on CUDA only")
def test_compiled_training_steps_match_eager_ones():
    """compile_model's blocks train as the uncompiled ones do: three steps, the same losses and trained
    parameters in fp32, within the tolerance of inductor's fused reductions."""
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
    """On the CPU (or with graphed=False) a TrainStep is the plain step: its loss equals the loss computed
    by hand before the update, and the update happens."""
    args, model = tiny_model()
    lora.inject(model, 4)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    images, masks = torch.rand(2, 3, 128, 128), torch.randint(0, 2, (2, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        expected = common.default_loss(model, images, masks)
    step = common.TrainStep(model, common.default_loss, torch.optim.AdamW(params, lr=1e-3), torch.device("cpu"), False)
    assert torch.allclose(step(images, masks), expected)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


def _method_model(method, extra=()):
    """A tiny SAM with `method`'s adapter injected as its main() does (default arguments)."""
    import importlib
    mod = importlib.import_module(method)
    args = mod.parse_args(["--model", "tiny", "--device", "cpu", *extra])
    device = common.setup(args, method, gpu_steps=10)
    model = common.load_sam(args, device)
    torch.manual_seed(0)
    from benchmarks.bench import ADAPTERS
    ADAPTERS[method][0](mod, model, args)
    return args, model


@pytest.mark.parametrize("method", ["lora", "atrous_lora", "salt", "balr_sam", "samora"])
def test_frozen_weights_to_bf16_casts_only_frozen_base_weights(method):
    """What the cast touches: frozen base weights of linear and convolution layers (LoRA's wrapped qkv
    included); never a trainable parameter, an adapter entry (so checkpoints stay fp32), a norm, or the
    weight of a layer that trains parameters of its own (SALT rebuilds W + delta from it)."""
    args, model = _method_model(method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    common.frozen_weights_to_bf16(model)
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
    """A stage that unfreezes a weight after the cast would train it in bf16: train_loop says so instead."""
    args, model = _method_model("lora")
    common.frozen_weights_to_bf16(model)
    model.image_encoder.blocks[0].mlp.lin1.weight.requires_grad_(True)
    with pytest.raises(common.UserError, match="not float32"):
        common.train_loop(model, lambda: None, common.default_loss, args, torch.device("cpu"), tmp_path, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast runs on CUDA")
@pytest.mark.parametrize("method", ["lora", "salt"])
def test_bf16_frozen_weights_give_what_autocast_gave(method):
    """Under bf16 autocast the stored bf16 weights are the values autocast made from the fp32 ones, so the
    forward is unchanged: bit for bit where every cast weight feeds a linear or convolution as it is."""
    args, model = _method_model(method)
    model = model.cuda().eval()
    x = torch.rand(2, 3, args.img_size, args.img_size, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        before = model(x)
        common.frozen_weights_to_bf16(model)
        after = model(x)
    assert torch.equal(before, after), (before - after).abs().max()


@pytest.mark.parametrize("capability,triton", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpus_older_than_triton_supports_run_uncompiled_without_the_kernels(monkeypatch, capsys, capability,
                                                                           triton):
    """A GPU of compute capability below 8.0 (a T4, an RTX 20xx, a V100: Triton cannot assemble bf16 code for
    them) is told so in one line, and gets neither torch.compile nor the Triton attention kernels; 8.0 and
    newer get both. The CUDA queries are faked: the decisions are what is checked."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # pick_device sets it; restored after
    monkeypatch.setattr(common, "_RELPOS", None)
    args = SimpleNamespace(device="auto", no_compile=False, model="vit_b")
    device = common.pick_device(args)
    told = "Tesla T4 has compute capability 7.5" in capsys.readouterr().out
    assert device.type == "cuda" and told == (not triton)
    assert common.should_compile(args, device) == triton
    if not triton:
        assert common._relpos_kernels() is None
    elif importlib.util.find_spec("triton") is not None:
        assert common._relpos_kernels() is not None

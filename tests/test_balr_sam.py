"""BALR-SAM on the tiny random SAM (CPU): no-op at init and both CDEN joins live, the low-rank decoder attention
against references (pooled keys and values, the exact image -> token form) and against stock's memory (what it
keeps for the backward pass), trainable count, training, the decoder measurement's code path, smoke run."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.transformer import Attention

import balr_sam
import cli
import common
from data import UserError

# the tiny model of common.VIT_CONFIGS: ViT width 64, 2 blocks, MLP 4x; decoder width 32, 2 two-way blocks;
# at its 128 input the decoder reads an 8 x 8 grid of image tokens
D_VIT, BLOCKS, D_DEC, GRID = 64, 2, 32, 8


def build(*extra):
    args = balr_sam.parse_args(["--model", "tiny", "--device", "cpu", *extra])
    device = cli.setup(args, "balr_sam", gpu_steps=10)
    return args, device, common.load_sam(args, device)


def inject(model, args):
    """As main() calls it: the command line's ranks and CDEN width."""
    balr_sam.inject(model, args.rank, args.decoder_rank, args.cden_width)


def build_trained(*extra):
    """The model main() builds (common.build_model: inject, then the spare mask tokens frozen)."""
    args, device, _ = build(*extra)
    return args, device, common.build_model(args, device, lambda model: inject(model, args))


def images(n=2, seed=0):
    """Smooth random images (B, 3, 128, 128): blobs a model can learn to segment."""
    low = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, 128, mode="bilinear", align_corners=False)


def close(out, ref, rel=1e-5):
    return torch.allclose(out, ref, rtol=rel, atol=rel * ref.abs().max().item())


def randomise(module, seed=0):
    """Every parameter random (biases too: SAM's decoder starts some at zero, which would hide a dropped bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def transformer_inputs(model, batch=2, seed=1):
    """What predict_masks hands the two-way transformer prompt-free: image (B, C, h, w), pe (1, C, h, w),
    tokens (1, T, C)."""
    dec, pe = model.mask_decoder, model.prompt_encoder
    grid = pe.image_embedding_size
    image = torch.randn(batch, dec.transformer_dim, *grid, generator=torch.Generator().manual_seed(seed))
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight])[None]
    return image, pe.get_dense_pe(), tokens


def test_starts_as_stock_sam_at_full_decoder_rank_and_both_cden_joins_are_live():
    args, _, model = build("--decoder-rank", "100000")  # r >= the grid: nothing pooled
    x = images()
    with torch.no_grad():
        ref = model(x)
        inject(model, args)
        assert isinstance(model.mask_decoder.transformer, balr_sam.LowRankTwoWayTransformer)
        out = model(x)
        assert close(out, ref), (out - ref).abs().max()  # the image -> token form is exact
        # the zero projections are what makes it a no-op: each join, once non-zero, changes the output
        for proj in (model.cden.to_embedding, model.cden.to_mask):
            proj.weight.normal_(0, 0.5)
            assert not close(model(x), ref, 1e-3)
            proj.weight.zero_()
        # and so are the LoRA B's, in the attention and in the MLP
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
                assert not close(model(x), ref, 1e-3), name
                p.zero_()


class PooledKeysAndValues(torch.nn.Module):
    """The test's own token -> image attention over pooled image tokens: stock Attention whose k and v (the
    image tokens, + pe and without) are first average-pooled by F.avg_pool2d to r x r."""

    def __init__(self, attn, grid, rank):
        super().__init__()
        self.attn, self.grid, self.rank = attn, grid, rank

    def pool(self, t):  # (B, h*w, C) -> (B, r*r, C)
        image = t.transpose(1, 2).unflatten(2, self.grid)
        return F.avg_pool2d(image, self.grid[0] // self.rank).flatten(2).transpose(1, 2)

    def forward(self, q, k, v):
        return self.attn(q=q, k=self.pool(k), v=self.pool(v))


@pytest.mark.parametrize("rank", [4, 2])
def test_token_to_image_attention_reads_the_image_tokens_averaged_over_r_by_r_cells(rank):
    """inject's decoder transformer against stock segment_anything's, in which each token -> image attention
    (both blocks and the final one) gets keys and values average-pooled to r x r by the test's own pooling,
    and each image -> token attention stays stock. The attentions see r*r keys; the output is not stock's."""
    args, _, model = build("--decoder-rank", str(rank))
    randomise(model.mask_decoder)
    stock = copy.deepcopy(model.mask_decoder.transformer)
    reference = copy.deepcopy(stock)
    for owner in [*reference.layers, reference]:
        name = "final_attn_token_to_image" if owner is reference else "cross_attn_token_to_image"
        setattr(owner, name, PooledKeysAndValues(getattr(owner, name), (GRID, GRID), rank))
    inject(model, args)
    seen = []
    for attn in (*[blk.cross_attn_token_to_image for blk in model.mask_decoder.transformer.layers],
                 model.mask_decoder.transformer.final_attn_token_to_image):
        attn.register_forward_hook(lambda m, inputs, kwargs, out: seen.append(kwargs["k"].shape[1]),
                                   with_kwargs=True)
    inputs = transformer_inputs(model)
    with torch.no_grad():
        got, want, unpooled = model.mask_decoder.transformer(*inputs), reference(*inputs), stock(*inputs)
    assert seen == [rank * rank] * 3
    for a, b, c in zip(got, want, unpooled):
        assert a.shape == b.shape and close(a, b), (a - b).abs().max()
        assert not close(a, c, 1e-3)  # the pooling changes the decoder (no silent full rank)


def test_image_to_token_low_rank_form_is_stock_attention():
    """image_to_token(attn, q, k, v) against stock Attention(q, k, v): 4 heads, width 64 -> 32, biases
    random, 200 image tokens as queries, 3 tokens as keys and values at batch 1 and 2; its output less the
    bias has rank at most heads * tokens = 12."""
    torch.manual_seed(0)
    attn = Attention(64, 4, downsample_rate=2)
    randomise(attn)
    q = torch.randn(2, 200, 64)
    for batch in (2, 1):
        k, v = torch.randn(batch, 3, 64), torch.randn(batch, 3, 64)
        want = attn(q=q, k=k, v=v)
        got = balr_sam.image_to_token(attn, q, k, v)
        assert got.shape == want.shape and close(got, want), (got - want).abs().max()
    s = torch.linalg.svdvals((got - attn.out_proj.bias)[0].detach())
    assert s[12] < 1e-5 * s[0], s[:14]  # rank 12 up to fp32 rounding


def saved_for_backward(fn, frozen=()):
    """Bytes of the storages autograd keeps for the backward pass while fn() runs, the `frozen` tensors'
    (parameters) left out: the activation memory of a training step."""
    left_out = {t.untyped_storage().data_ptr() for t in frozen}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in left_out:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_low_rank_attention_keeps_less_for_the_backward_pass_than_stock():
    """The memory the low-rank form is for, at SAM's decoder sizes (width 256, attention 128 wide in 8 heads,
    5 tokens, MLP 2048; a 16 x 16 grid to stay fast): the pooling keeps nothing of the image tokens (a pooling
    that kept its input would), the image -> token form keeps less than stock's attention, and so does the
    transformer at r = 8, a quarter of the keys (without pooling it keeps 0.9 of stock)."""
    torch.manual_seed(0)
    x = torch.randn(2, 256, 32, requires_grad=True)
    assert saved_for_backward(lambda: balr_sam.pool_tokens(x, (16, 16), 8)) == 0
    attn = Attention(256, 8, downsample_rate=2)
    q, k, v = torch.randn(2, 256, 256, requires_grad=True), torch.randn(2, 5, 256), torch.randn(2, 5, 256)
    low = saved_for_backward(lambda: balr_sam.image_to_token(attn, q, k, v), attn.parameters())
    assert low < 0.75 * saved_for_backward(lambda: attn(q=q, k=k, v=v), attn.parameters())  # measured 0.69
    stock = TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
    transformer = balr_sam.LowRankTwoWayTransformer(copy.deepcopy(stock), 8)
    stock_forwards = []  # the image -> token attentions run as image_to_token, never as the stock module
    for blk in transformer.layers:
        blk.cross_attn_image_to_token.register_forward_hook(lambda *_: stock_forwards.append(1))
    inputs = torch.randn(2, 256, 16, 16), torch.randn(1, 256, 16, 16), torch.randn(1, 5, 256)
    low = saved_for_backward(lambda: transformer(*inputs), transformer.parameters())
    assert not stock_forwards
    # measured 0.48; with stock image -> token attention 0.57, with a pooling that keeps its input 0.60
    assert low < 0.55 * saved_for_backward(lambda: stock(*inputs), stock.parameters())


def cden_count(w, d):
    """CDEN's parameters, from its description: convs have no bias (GroupNorm follows, weight + bias each)."""
    ds = lambda i, o: 9 * i + 2 * i + i * o + 2 * o  # DW3x3 + GN + PW1x1 + GN
    stem = 27 * (w // 2) + 2 * (w // 2)
    stages = ds(w // 2, w) + ds(w, w) + ds(w, 2 * w) + ds(2 * w, 2 * w) + ds(2 * w, 4 * w) + ds(4 * w, 4 * w)
    fuse = 7 * w * w + 2 * w
    return stem + stages + fuse + (w * d + d) + (w * d // 8 + d // 8)


@pytest.mark.parametrize("rank,decoder_rank", [(4, 4), (2, 32), (4, 0)])
def test_trainable_parameters_are_the_adapters_and_the_decoder(rank, decoder_rank):
    _, _, stock = build()
    stock_decoder = sum(p.numel() for p in stock.mask_decoder.parameters())
    # the hypernetworks of SAM's spare mask tokens (2 and 3 with one class) make no mask and stay frozen
    stock_decoder -= sum(p.numel() for p in stock.mask_decoder.output_hypernetworks_mlps[2:].parameters())
    args, _, model = build_trained("--rank", str(rank), "--decoder-rank", str(decoder_rank))
    hidden = 4 * D_VIT
    lora = BLOCKS * (2 * rank * (D_VIT + D_VIT) + 2 * rank * (D_VIT + hidden))  # q/v + lin1 + lin2
    # the low-rank decoder attention adds no parameter
    expected = lora + cden_count(args.cden_width, D_DEC) + stock_decoder + D_DEC  # + no_mask_embed
    assert common.count_parameters(model)[0] == expected
    assert sum(balr_sam.trainable_by_part(model).values()) == expected
    for name, p in model.named_parameters():
        adapter = "lora_" in name or name.startswith("cden.")
        if adapter:
            assert p.requires_grad, name
        if p.requires_grad:
            assert adapter or name.startswith("mask_decoder.") or name == "prompt_encoder.no_mask_embed.weight", name
    names = [n for n, _ in model.named_parameters()]
    assert sum(".mlp.lin1.lora_A" in n or ".mlp.lin2.lora_A" in n for n in names) == 2 * BLOCKS
    # the decoder keeps stock SAM's state-dict keys: a stock decoder's weights load into it unchanged
    decoder_keys = {k for k in model.state_dict() if k.startswith("mask_decoder.")}
    assert decoder_keys == {k for k in stock.state_dict() if k.startswith("mask_decoder.")}


def test_each_image_is_decoded_on_its_own():
    """Batch of 2 = each image alone: no B*B masks from expanded prompts, no coupling across the batch
    (GroupNorm, and pooling within each image; BatchNorm in training mode would fail this)."""
    args, _, model = build("--decoder-rank", "4")
    inject(model, args)
    torch.nn.init.normal_(model.cden.to_mask.weight, 0, 0.5)
    torch.nn.init.normal_(model.cden.to_embedding.weight, 0, 0.5)
    model.train()
    x = images(2)
    with torch.no_grad():
        both = model(x)
        assert both.shape == (2, 2, 32, 32)
        assert close(both[:1], model(x[:1])) and close(both[1:], model(x[1:]))


def test_training_lowers_the_loss_reaches_cden_and_reloads(tmp_path):
    args, device, model = build("--decoder-rank", "4")
    inject(model, args)
    stem = model.cden.stem[0].weight.detach().clone()
    x = images(2)
    masks = (x[:, 1] > 0.5).to(torch.uint8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = common.default_loss(model, x, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert model.cden.to_mask.weight.abs().sum() > 0 and not torch.equal(model.cden.stem[0].weight, stem)
    model.eval()
    with torch.no_grad():
        out = model(x)
    common.save_checkpoint(tmp_path / "c.pt", model, args)
    args2, _, fresh = build("--decoder-rank", "4")
    inject(fresh, args2)
    common.load_checkpoint(tmp_path / "c.pt", fresh, args2)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_bad_arguments_are_user_errors():
    """inject says what does not fit (ValueError); main, through common.build_model, makes it a UserError."""
    for flags, message in ((["--cden-width", "24"], "--cden-width 24"), (["--decoder-rank", "-1"], "--decoder-rank -1"),
                           (["--decoder-rank", "3"], "--decoder-rank 3 does not cut .* such as 2"),
                           (["--rank", "0"], "--rank 0")):
        args, _, model = build(*flags)
        with pytest.raises(ValueError, match=message):
            inject(model, args)
        with pytest.raises(UserError, match=message):
            balr_sam.main(["--model", "tiny", "--device", "cpu", *flags])


def test_measurement_code_path_runs_on_the_cpu_and_the_measurement_needs_cuda(tmp_path, capsys):
    """--measure-decoder's parts without CUDA: both decoders (stock, low-rank), whole and their transformer
    alone, in inference and in a training step, where every transformer parameter gets a gradient. The
    measurement itself stops with one sentence and status 2 where there is no CUDA (or --device cpu)."""
    _, device, model = build()
    decoders = balr_sam.decoders_to_measure(model, 4)
    assert list(decoders) == ["stock", "balr_sam r=4"]
    inputs = balr_sam.decoder_inputs(model, 2, device)
    for decoder in decoders.values():
        for part in ("decoder", "transformer"):
            for train in (False, True):
                decoder.zero_grad(set_to_none=True)
                outputs = balr_sam.run_decoder(decoder, inputs, train, device, part)
                assert all(torch.isfinite(o).all() for o in outputs)
                if train:
                    assert all(p.grad is not None for p in decoder.transformer.parameters())
    stock_masks, low_masks = (balr_sam.run_decoder(d, inputs, False, device)[0] for d in decoders.values())
    assert stock_masks.shape == low_masks.shape == (2, 4, 32, 32) and not close(low_masks, stock_masks, 1e-3)
    argv = ["balr_sam.py", "--model", "tiny", "--device", "cpu", "--measure-decoder", str(tmp_path / "d.json")]
    with pytest.raises(SystemExit) as exit_:
        cli.main_guard(lambda: balr_sam.main(argv[1:]))
    assert exit_.value.code == 2 and not (tmp_path / "d.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --measure-decoder") and "CUDA" in err[0]


def test_smoke_main(tmp_path):
    metrics = balr_sam.main(["--model", "tiny", "--device", "cpu", "--steps", "4", "--log-every", "2",
                             "--synthetic-train", "4", "--synthetic-test", "2", "--zoom", "1", "--out", str(tmp_path),
                             "--decoder-rank", "4"])
    assert 0 <= metrics["dice"] <= 1 and metrics["steps"] == 4
    assert metrics["trainable_by_part"]["cden"] == cden_count(32, D_DEC)
    run = tmp_path / "balr_sam_synthetic_tiny_s0"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["method"] == "balr_sam" and sum(saved["trainable_by_part"].values()) == saved["trainable_params"]
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()

"""atrous_lora.py on the CPU: no-op at init, the AAM's shapes and path separation, q/v layout, trainable
count, gradients through the AAM, checkpoints, bad arguments, smoke run."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import atrous_lora
import cli
import common
from data import UserError


def tiny_model(extra=()):
    args = atrous_lora.parse_args(["--model", "tiny", "--device", "cpu", *extra])
    device = cli.setup(args, "atrous_lora", gpu_steps=10)
    return args, device, common.load_sam(args, device)


def randomise_adapter(model, std=0.1, seed=1):
    """As if trained: every adapter weight non-zero (B included), so every path of the AAM is live."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)


def test_is_a_no_op_at_initialisation_and_not_after():
    args, device, model = tiny_model()
    x = torch.rand(2, 3, args.img_size, args.img_size)
    with torch.no_grad():
        before = model(x)
        atrous_lora.inject(model, 4, (1, 2, 3))
        after = model(x)
        assert torch.equal(before, after)  # B = 0 exactly, so the outputs are bit-identical
        randomise_adapter(model)
        assert not torch.allclose(model(x), before, atol=1e-3)  # the zero B was what made it a no-op


def aam_and_tokens(shape, side=None, seed=0):
    torch.manual_seed(seed)
    aam = atrous_lora.AtrousAttention(rank=4, rates=(1, 2, 3), paths=2, side=side)
    return aam, torch.randn(*shape)


@pytest.mark.parametrize("shape,side", [((6, 14, 14, 8), None),  # ViT windows (B*nW, 14, 14, 2r)
                                        ((3, 8, 8, 8), None),  # a global block's whole map
                                        ((5, 49, 8), 7)])  # TinyViT flat windows (B*nW, 7*7, 2r)
def test_aam_keeps_the_token_shape_and_keeps_q_and_v_apart(shape, side):
    aam, z = aam_and_tokens(shape, side)
    with torch.no_grad():
        out = aam(z)
        assert out.shape == z.shape
        z2 = z.clone()
        z2[..., 4:] += torch.randn_like(z2[..., 4:])  # change only the v path's channels
        out2 = aam(z2)
    assert torch.equal(out2[..., :4], out[..., :4])  # q's AAM does not read v's channels (grouped convs)
    assert not torch.allclose(out2[..., 4:], out[..., 4:])


def aam_by_hand(aam, z):
    """The AAM of each path on its own, as described: its r channels through the 1x1 branch, every dilated
    3x3 branch and the pooled branch, GELU, the 1x1 fuse to F, then z + sigmoid(gate(F)) * F; the grouped
    convolutions' weights sliced to that path's group. z (B', h, w, paths*r)."""
    r, x, paths = aam.rank, z.permute(0, 3, 1, 2), []
    for i in range(aam.paths):
        own = slice(i * r, (i + 1) * r)

        def conv(m, inp):
            return F.conv2d(inp, m.weight[own], m.bias[own], padding=m.padding, dilation=m.dilation)
        zi = x[:, own]
        branches = [conv(aam.point, zi), *(conv(a, zi) for a in aam.atrous),
                    conv(aam.pool, zi.mean((2, 3), keepdim=True)).expand_as(zi)]
        fused = conv(aam.fuse, F.gelu(torch.cat(branches, 1)))
        paths.append(zi + torch.sigmoid(conv(aam.gate, fused)) * fused)
    return torch.cat(paths, 1).permute(0, 2, 3, 1)


@pytest.mark.parametrize("shape,side,rates", [((4, 14, 14, 8), None, (1, 2, 3)), ((5, 49, 8), 7, (1, 2, 3)),
                                              ((3, 14, 14, 8), None, (2, 5))])
def test_aam_is_each_paths_branches_fused_and_gated(shape, side, rates):
    """forward (all paths in one call, grouped convolutions) against each path's AAM computed branch by
    branch from the description; random (non-zero) weights, fp32."""
    torch.manual_seed(1)
    aam = atrous_lora.AtrousAttention(rank=4, rates=rates, paths=2, side=side)
    for p in aam.parameters():
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(*shape)
    with torch.no_grad():
        grid = z.unflatten(1, (side, side)) if side else z
        assert torch.allclose(aam(z), aam_by_hand(aam, grid).reshape(shape), atol=1e-5, rtol=1e-5)


def test_aam_is_multi_scale_and_local_to_each_window():
    """A single changed token reaches exactly the neighbourhood the rates allow (Chebyshev distance <= 3)
    plus, weakly, everything through the pooling branch; it never crosses into another window."""
    aam, z = aam_and_tokens((2, 14, 14, 8))
    with torch.no_grad():
        aam.pool.weight.zero_()  # switch the image-level branch off to see the atrous receptive field
        out = aam(z)
        z2 = z.clone()
        z2[0, 7, 7, :4] += 1.0
        moved = (aam(z2) - out).abs().amax(-1)  # (2, 14, 14)
    assert moved[1].max() == 0  # the other window (batch entry) is untouched
    rows, cols = torch.nonzero(moved[0] > 0, as_tuple=True)
    assert (rows - 7).abs().max() == 3 and (cols - 7).abs().max() == 3  # rate 3 reaches 3 tokens away
    assert moved[0, 7 + 3, 7 + 3] > 0 and moved[0, 7 + 2, 7 + 1] == 0  # dilated taps only, not a dense 7x7


def test_aam_with_a_zero_fused_map_is_the_identity_so_the_path_is_plain_lora():
    aam, z = aam_and_tokens((3, 14, 14, 8))
    with torch.no_grad():
        assert not torch.allclose(aam(z), z, atol=1e-4)
        aam.fuse.weight.zero_()
        aam.fuse.bias.zero_()
        assert torch.equal(aam(z), z)  # z + alpha * 0: the residual carries A x to B unchanged


def test_aam_flat_tokens_equal_the_same_tokens_as_a_grid():
    aam, z = aam_and_tokens((4, 7, 7, 8), side=7)
    with torch.no_grad():
        assert torch.allclose(aam(z.flatten(1, 2)), aam(z).flatten(1, 2), atol=1e-6)  # row-major windows


def test_vit_update_touches_only_q_and_v():
    torch.manual_seed(0)
    qkv = nn.Linear(16, 48)
    wrapped = atrous_lora.AtrousLoRAQKV(qkv, rank=2, rates=(1, 2))
    x = torch.randn(3, 5, 5, 16)  # (B, H, W, C) as in SAM's ViT blocks
    with torch.no_grad():
        assert torch.equal(wrapped(x), qkv(x))
        nn.init.normal_(wrapped.lora_B_q.weight)
        diff = wrapped(x) - qkv(x)
    assert diff[..., :16].abs().max() > 0  # q moved
    assert torch.equal(diff[..., 16:], torch.zeros_like(diff[..., 16:]))  # k and v did not (B_v is still 0)


def test_tinyvit_attention_is_a_no_op_then_follows_the_per_head_layout():
    from mobile_sam.modeling.tiny_vit_sam import Attention
    torch.manual_seed(0)
    attn = Attention(dim=32, key_dim=8, num_heads=4, attn_ratio=1, resolution=(7, 7))
    attn.eval()
    x = torch.randn(3, 49, 32)  # (B*nW, ws*ws, C) as in TinyViT's 7x7 windows
    with torch.no_grad():
        ref, qkv_ref = attn(x), attn.qkv(attn.norm(x))
        stock_qkv = attn.qkv
        attn.qkv = atrous_lora.AtrousLoRAQKV(stock_qkv, rank=2, rates=(1, 2, 3), heads=4, side=7)
        assert torch.equal(attn(x), ref)  # the whole attention layer, B = 0
        nn.init.normal_(attn.qkv.lora_B_v.weight)
        diff = (attn.qkv(attn.norm(x)) - qkv_ref).unflatten(-1, (4, 3, 8))  # TinyViT splits per head [q, k, v]
    assert torch.equal(diff[..., 0, :], torch.zeros_like(diff[..., 0, :]))  # q untouched (B_q = 0)
    assert torch.equal(diff[..., 1, :], torch.zeros_like(diff[..., 1, :]))  # k never touched
    assert (diff[..., 2, :].abs().amax(-1) > 0).all()  # v moved in every head


def aam_formula(r, k):
    """One path's AAM, counted by hand: conv weights out*in_per_group*kh*kw, plus a bias per output."""
    point = r * r + r
    atrous = k * (r * r * 9 + r)
    pool = r * r + r
    fuse = r * (k + 2) * r + r  # the concatenated k + 2 branches of the path, r channels each
    gate = r * r + r
    return point + atrous + pool + fuse + gate


@pytest.mark.parametrize("rank,rates", [(4, (1, 2, 3)), (3, (1, 2))])
def test_exactly_the_intended_parameters_train(rank, rates):
    """What trains in the model main() builds (common.build_model: inject, then the spare mask tokens'
    hypernetworks frozen)."""
    args, device, stock = tiny_model()
    decoder = sum(p.numel() for p in stock.mask_decoder.parameters())
    # the hypernetworks of SAM's spare mask tokens (2 and 3 with one class) make no mask and stay frozen
    decoder -= sum(p.numel() for p in stock.mask_decoder.output_hypernetworks_mlps[2:].parameters())
    no_mask = stock.prompt_encoder.no_mask_embed.weight.numel()
    model = common.build_model(args, device, lambda m: atrous_lora.inject(m, rank, rates))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("mask_decoder.") or n == "prompt_encoder.no_mask_embed.weight"
               for n in names)
    assert not any(n.startswith("image_encoder.") and "lora_" not in n for n in names)
    assert any(".lora_aam.atrous." in n for n in names)
    trainable, _ = common.count_parameters(model)
    # tiny ViT: 2 blocks, d = 64 (qkv 64 -> 192): per block 2 paths of A (64 r) + B (r 64) + AAM
    per_path = rank * 64 + rank * 64 + aam_formula(rank, len(rates))
    assert atrous_lora.adapter_parameter_count(model, rank, len(rates)) == 2 * 2 * per_path
    assert trainable == 2 * 2 * per_path + decoder + no_mask


def test_gradients_reach_a_b_and_the_aam_after_the_first_step():
    """With B = 0 only B gets a gradient at step 0 (as in LoRA); after one update every part learns."""
    args, device, model = tiny_model()
    atrous_lora.inject(model, 4, (1, 2, 3))
    x = torch.rand(2, 3, args.img_size, args.img_size)
    adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW(adapter.values(), lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step == 0:
            assert all((p.grad is None or p.grad.abs().max() == 0) == ("lora_B" not in n) for n, p in adapter.items())
        opt.step()
    dead = [n for n, p in adapter.items() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, dead


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    args, device, model = tiny_model()
    atrous_lora.inject(model, 4, (1, 2, 3))
    randomise_adapter(model)
    common.save_checkpoint(tmp_path / "best.pt", model, args, step=0)
    _, _, fresh = tiny_model()
    atrous_lora.inject(fresh, 4, (1, 2, 3))
    common.load_checkpoint(tmp_path / "best.pt", fresh, args)
    x = torch.rand(2, 3, args.img_size, args.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    saved = torch.load(tmp_path / "best.pt", weights_only=True)["state"]
    assert any(".lora_aam." in k for k in saved)
    assert not any(k.startswith("image_encoder.") and "lora_" not in k for k in saved)  # frozen base not saved


@pytest.mark.parametrize("text", ["a,b", "", "1,,2", "0,1", "-1", "2,2", "1.5"])
def test_bad_rates_are_a_user_error(text):
    with pytest.raises(UserError, match="--rates"):
        atrous_lora.parse_rates(text)


def test_rates_and_rank_that_do_not_fit_are_user_errors():
    """inject says what does not fit (ValueError); main, through common.build_model, makes it a UserError."""
    assert atrous_lora.parse_rates(" 1, 2,3") == (1, 2, 3)
    args, device, model = tiny_model()
    with pytest.raises(ValueError, match="4x4"):  # the tiny model's windows are 4x4: rate 4 reads only padding
        atrous_lora.inject(model, 4, (1, 4))
    with pytest.raises(ValueError, match="--rank 0"):
        atrous_lora.inject(model, 0, (1, 2))
    with pytest.raises(ValueError, match="between 1 and 64"):
        atrous_lora.inject(model, 65, (1, 2))
    for flags, message in ((["--rates", "1,4"], "4x4"), (["--rank", "0"], "--rank 0"),
                           (["--rank", "65"], "between 1 and 64"), (["--rates", "x"], "--rates")):
        with pytest.raises(UserError, match=message):
            atrous_lora.main(["--model", "tiny", "--device", "cpu", *flags])


def test_smoke_run_writes_metrics(tmp_path):
    metrics = atrous_lora.main(["--model", "tiny", "--device", "cpu", "--steps", "4", "--batch-size", "2",
                                "--synthetic-train", "4", "--synthetic-test", "2", "--rates", "1,2",
                                "--out", str(tmp_path), "--run-name", "smoke"])
    run = tmp_path / "smoke"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["method"] == "atrous_lora" and saved["args"]["rates"] == "1,2" and len(saved["per_image"]) == 2
    assert 0 <= metrics["dice"] <= 1
    assert metrics["untrained_dice"] is not None
    for f in ("best.pt", "last.pt", "predictions.png", "curves.png"):
        assert (run / f).is_file()
    state = torch.load(run / "last.pt", weights_only=True)["state"]
    assert any(k.endswith("lora_B_q.weight") and v.abs().max() > 0 for k, v in state.items())  # B trained



def aam_path_from_the_rates(aam, i, z, rates):
    """Path i's AAM written out with the dilation rates given here (not read from the module): the 1x1
    branch, a 3x3 branch per rate (padding = rate: same size), the grid's mean through a 1x1 conv, broadcast;
    GELU, the 1x1 fuse to F, then z + sigmoid(gate(F)) * F. Weights sliced to path i's group. z (B', r, h, w)."""
    own = slice(i * aam.rank, (i + 1) * aam.rank)

    def conv(m, inp, rate=None):
        return F.conv2d(inp, m.weight[own], m.bias[own], padding=rate or 0, dilation=rate or 1)
    pooled = conv(aam.pool, z.mean((2, 3), keepdim=True)).expand_as(z)
    branches = [conv(aam.point, z), *(conv(a, z, rate) for a, rate in zip(aam.atrous, rates)), pooled]
    fused = conv(aam.fuse, F.gelu(torch.cat(branches, 1)))
    return z + torch.sigmoid(conv(aam.gate, fused)) * fused


@pytest.mark.parametrize("heads,side", [(None, None), (4, 5)])  # ViT (B', h, w, d); TinyViT (B', side^2, d)
def test_layer_is_w_x_plus_b_aam_of_a_x_on_q_and_v(heads, side):
    """The whole layer against the formula, every weight random: q = W_q x + b_q + B_q AAM_q(A_q x),
    k = W_k x + b_k, v = W_v x + b_v + B_v AAM_v(A_v x), each path's AAM fed by its own A and built on the
    rates 1, 2, 3; in SAM's [q | k | v] layout, or TinyViT's per head [q_h | k_h | v_h] on a side x side grid."""
    torch.manual_seed(0)
    rates, width = (1, 2, 3), 16
    qkv = nn.Linear(16, 3 * width)
    layer = atrous_lora.AtrousLoRAQKV(qkv, rank=3, rates=rates, heads=heads, side=side)
    for name, p in layer.named_parameters():
        if "lora_" in name:
            nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 9, 16) if side is None else torch.randn(2, side * side, 16)
    grid = x if side is None else x.unflatten(1, (side, side))  # row-major windows
    with torch.no_grad():
        delta = layer(x) - qkv(x)
        want = []
        for i, (A, B) in enumerate(((layer.lora_A_q, layer.lora_B_q), (layer.lora_A_v, layer.lora_B_v))):
            z = (grid @ A.weight.T).permute(0, 3, 1, 2)  # (B', r, h, w)
            path = aam_path_from_the_rates(layer.lora_aam, i, z, rates).permute(0, 2, 3, 1) @ B.weight.T
            want.append(path.reshape(*x.shape[:-1], width))
    parts = (delta.unflatten(-1, (3, width)) if heads is None  # (..., 3, width): q, k, v
             else delta.unflatten(-1, (heads, 3, -1)).transpose(-3, -2).flatten(-2))
    torch.testing.assert_close(parts[..., 0, :], want[0], atol=1e-5, rtol=1e-5)
    assert parts[..., 1, :].abs().max() == 0  # k untouched
    torch.testing.assert_close(parts[..., 2, :], want[1], atol=1e-5, rtol=1e-5)


def test_pooling_covers_the_grid_each_attention_sees(one_thread):
    """The module docstring's account of the pooling branch, which averages the grid its qkv sees: at 1024,
    ViT-B's windowed blocks see a 14x14 window and its 4 global blocks (2, 5, 8, 11) the whole 64x64 map;
    every TinyViT attention sees a 7x7 or 14x14 window of a larger map (no global attention)."""
    with torch.device("meta"):
        vit = common.build_sam_parts("vit_b", 1024, 1)[0]
    sides = atrous_lora.grid_sides(vit)
    assert [sides[blk.attn] for blk in vit.blocks] == [14, 14, 64] * 4
    tinyvit = common.build_sam_parts("mobile_sam", 1024, 1)[0]
    sides = atrous_lora.grid_sides(tinyvit)
    blocks = [blk for layer in tinyvit.layers[1:] for blk in layer.blocks]
    assert len(blocks) == 10 and {sides[blk.attn] for blk in blocks} == {7, 14}
    assert all(sides[blk.attn] == blk.window_size < min(blk.input_resolution) for blk in blocks)

"""BALR-SAM on the tiny random SAM (CPU): no-op at init, SVD factorisation, trainable count, training, smoke run."""
import json

import pytest
import torch

import balr_sam
import common
from data import UserError

# the tiny model of common.VIT_CONFIGS: ViT width 64, 2 blocks, MLP 4x; decoder width 32, 2 two-way blocks
D_VIT, BLOCKS, D_DEC = 64, 2, 32


def build(*extra):
    args = balr_sam.parse_args(["--model", "tiny", "--device", "cpu", *extra])
    device = common.setup(args, "balr_sam", gpu_steps=10)
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


def test_starts_as_stock_sam_at_full_decoder_rank_and_both_cden_joins_are_live():
    args, _, model = build("--decoder-rank", "100000")  # clipped to each projection's full rank
    x = images()
    with torch.no_grad():
        ref = model(x)
        inject(model, args)
        out = model(x)
        assert close(out, ref), (out - ref).abs().max()
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


def test_low_rank_projection_is_the_truncated_svd():
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 128)
    x = torch.randn(4, 50, 256)
    full = balr_sam.LowRankLinear(dense, 1000)
    assert full.rank == 128
    assert close(full(x), dense(x))
    low = balr_sam.LowRankLinear(dense, 8)
    s = torch.linalg.svdvals(dense.weight.double())
    err = torch.linalg.matrix_norm((low.lowrank_U @ low.lowrank_V).double() - dense.weight.double())
    assert torch.isclose(err, s[8:].square().sum().sqrt(), rtol=1e-4)  # Eckart-Young: the best rank-8 error
    # in the model: a lower rank starts from the truncation, not from stock SAM
    args, _, model = build("--decoder-rank", "4")
    with torch.no_grad():
        ref = model(images())
        inject(model, args)
        out = model(images())
    assert torch.isfinite(out).all() and not close(out, ref, 1e-4)


def cden_count(w, d):
    """CDEN's parameters, from its description: convs have no bias (GroupNorm follows, weight + bias each)."""
    ds = lambda i, o: 9 * i + 2 * i + i * o + 2 * o  # DW3x3 + GN + PW1x1 + GN
    stem = 27 * (w // 2) + 2 * (w // 2)
    stages = ds(w // 2, w) + ds(w, w) + ds(w, 2 * w) + ds(2 * w, 2 * w) + ds(2 * w, 4 * w) + ds(4 * w, 4 * w)
    fuse = 7 * w * w + 2 * w
    return stem + stages + fuse + (w * d + d) + (w * d // 8 + d // 8)


@pytest.mark.parametrize("rank,decoder_rank", [(4, 32), (2, 4), (4, 0)])
def test_trainable_parameters_are_the_adapters_and_the_decoder(rank, decoder_rank):
    _, _, stock = build()
    stock_decoder = sum(p.numel() for p in stock.mask_decoder.parameters())
    # the hypernetworks of SAM's spare mask tokens (2 and 3 with one class) make no mask and stay frozen
    stock_decoder -= sum(p.numel() for p in stock.mask_decoder.output_hypernetworks_mlps[2:].parameters())
    args, _, model = build_trained("--rank", str(rank), "--decoder-rank", str(decoder_rank))
    hidden = 4 * D_VIT
    lora = BLOCKS * (2 * rank * (D_VIT + D_VIT) + 2 * rank * (D_VIT + hidden))  # q/v + lin1 + lin2
    # 7 attentions: 2 self-attentions 32 -> 32, 5 cross-attentions 32 -> 16 (downsample 2); 3 projections each
    shapes = [(D_DEC, D_DEC)] * 2 + [(D_DEC, D_DEC // 2)] * 5
    decoder = stock_decoder
    if decoder_rank:
        for d_in, d_out in shapes:
            r = min(decoder_rank, d_in, d_out)
            decoder += 3 * (r * (d_in + d_out) - d_in * d_out)
    expected = lora + cden_count(args.cden_width, D_DEC) + decoder + D_DEC  # + no_mask_embed
    assert common.count_parameters(model)[0] == expected
    for name, p in model.named_parameters():
        adapter = "lora_" in name or "lowrank_" in name or name.startswith("cden.")
        if adapter:
            assert p.requires_grad, name
        if p.requires_grad:
            assert adapter or name.startswith("mask_decoder.") or name == "prompt_encoder.no_mask_embed.weight", name
    names = [n for n, _ in model.named_parameters()]
    assert sum(".mlp.lin1.lora_A" in n or ".mlp.lin2.lora_A" in n for n in names) == 2 * BLOCKS
    assert sum("lowrank_U" in n for n in names) == (21 if decoder_rank else 0)


def test_each_image_is_decoded_on_its_own():
    """Batch of 2 = each image alone: no B*B masks from expanded prompts, no coupling across the batch
    (GroupNorm; BatchNorm in training mode would fail this)."""
    args, _, model = build()
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
    args, device, model = build("--decoder-rank", "8")
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
    args2, _, fresh = build("--decoder-rank", "8")
    inject(fresh, args2)
    common.load_checkpoint(tmp_path / "c.pt", fresh, args2)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_bad_arguments_are_user_errors():
    """inject says what does not fit (ValueError); main, through common.build_model, makes it a UserError."""
    for flags, message in ((["--cden-width", "24"], "--cden-width 24"), (["--decoder-rank", "-1"], "--decoder-rank -1"),
                           (["--rank", "0"], "--rank 0")):
        args, _, model = build(*flags)
        with pytest.raises(ValueError, match=message):
            inject(model, args)
        with pytest.raises(UserError, match=message):
            balr_sam.main(["--model", "tiny", "--device", "cpu", *flags])


def test_measure_decoder_runs():
    _, device, model = build()
    bench = balr_sam.measure_decoder(model, 4, 2, device, repeats=2)
    dense, low = bench["results"].values()
    assert low["qkv_params"] < dense["qkv_params"]
    assert low["decoder_params"] == dense["decoder_params"] - dense["qkv_params"] + low["qkv_params"]
    assert all(r["infer_ms"] > 0 and r["train_ms"] > 0 for r in (dense, low))


def test_smoke_main(tmp_path):
    metrics = balr_sam.main(["--model", "tiny", "--device", "cpu", "--steps", "4", "--log-every", "2",
                             "--synthetic-train", "4", "--synthetic-test", "2", "--zoom", "1", "--out", str(tmp_path)])
    assert 0 <= metrics["dice"] <= 1 and metrics["steps"] == 4
    assert metrics["trainable_by_part"]["cden"] == cden_count(32, D_DEC)
    run = tmp_path / "balr_sam_synthetic_tiny_s0"
    assert json.loads((run / "metrics.json").read_text())["method"] == "balr_sam"
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()

"""lora.py and the shared machinery it uses: no-op at init, q/v layout, trainable set, checkpoints, smoke run."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import common
import lora
import metrics
from data import load_data
from fast import forwards


def tiny_model(extra=()):
    args = lora.parse_args(["--model", "tiny", "--device", "cpu", *extra])
    device = cli.setup(args, "lora", gpu_steps=10)
    return args, device, common.load_sam(args, device)


def test_lora_is_a_no_op_at_initialisation():
    args, device, model = tiny_model()
    x = torch.rand(2, 3, args.img_size, args.img_size)
    with torch.no_grad():
        before = model(x)
        lora.inject(model, rank=4)
        after = model(x)
    assert torch.equal(before, after)  # B = 0 exactly, so the outputs are bit-identical


def test_vit_update_touches_only_q_and_v():
    qkv = nn.Linear(16, 48)
    wrapped = lora.LoRAQKV(qkv, rank=2)
    nn.init.normal_(wrapped.lora_B_q.weight)
    x = torch.randn(3, 5, 5, 16)  # (B, H, W, C) as in SAM's ViT blocks
    diff = (wrapped(x) - qkv(x)).detach()
    assert diff[..., :16].abs().max() > 0  # q moved
    assert torch.equal(diff[..., 16:], torch.zeros_like(diff[..., 16:]))  # k and v did not (B_v is still 0)


def test_update_is_b_a_x_on_q_and_v():
    """The forward gives W x + b plus B_q A_q x on q and B_v A_v x on v, each path with its own A and B, and
    the merged weight gives the same."""
    torch.manual_seed(0)
    qkv = nn.Linear(16, 48)
    wrapped = lora.LoRAQKV(qkv, rank=3)
    for p in wrapped.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, 5, 5, 16)
    A_q, B_q, A_v, B_v = (getattr(wrapped, f"lora_{n}").weight for n in ("A_q", "B_q", "A_v", "B_v"))
    q, k, v = F.linear(x, qkv.weight, qkv.bias).split(16, -1)
    want = torch.cat([q + x @ A_q.T @ B_q.T, k, v + x @ A_v.T @ B_v.T], -1)
    torch.testing.assert_close(wrapped(x), want)
    torch.testing.assert_close(F.linear(x, wrapped.merged_weight(), qkv.bias), want)


def test_tinyvit_update_follows_the_per_head_layout():
    from mobile_sam.modeling.tiny_vit_sam import Attention
    attn = Attention(dim=32, key_dim=8, num_heads=4, attn_ratio=1, resolution=(4, 4))
    wrapped = lora.LoRAQKV(attn.qkv, rank=2, heads=4)
    nn.init.normal_(wrapped.lora_B_v.weight)
    x = torch.randn(2, 16, 32)  # (B*nW, ws*ws, C) as in TinyViT's windows
    diff = (wrapped(x) - attn.qkv(x)).detach().unflatten(-1, (4, 3, 8))  # TinyViT splits per head [q, k, v]
    assert torch.equal(diff[..., 0, :], torch.zeros_like(diff[..., 0, :]))  # q untouched (B_q = 0)
    assert torch.equal(diff[..., 1, :], torch.zeros_like(diff[..., 1, :]))  # k never touched
    assert (diff[..., 2, :].abs().amax(-1) > 0).all()  # v moved in every head


@pytest.mark.parametrize("heads", [None, 4])  # SAM's ViT [q | k | v]; TinyViT per head [q_h | k_h | v_h]
def test_qv_update_is_each_path_up_projected_into_its_place(heads):
    """fast.forwards.linear_with_qv_update (ViT: one product of [x | z] with [W | U^T] and a backward of its
    own; TinyViT: an addmm onto W x + b) gives W x + b + [B_q z_q | 0 | B_v z_v] in the layout's order, and
    the same gradients for x, z, the bias, both up-projections and a weight that trains, as the r-wide
    products laid out by place_qv, which lays them out as lora.py's own qv_update does."""
    torch.manual_seed(0)
    x, z = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 6, requires_grad=True)
    B_q, B_v = torch.randn(16, 3, requires_grad=True), torch.randn(16, 3, requires_grad=True)
    for weight_trains in (False, True):  # frozen, as every method has it; trained, as the kernel tests have it
        weight, bias = torch.randn(48, 16, requires_grad=weight_trains), torch.randn(48, requires_grad=True)
        dq, dv = z[..., :3] @ B_q.T, z[..., 3:] @ B_v.T
        assert torch.equal(forwards.place_qv(dq, dv, heads), lora.qv_update(dq, dv, heads))
        want = F.linear(x, weight, bias) + forwards.place_qv(dq, dv, heads)
        got = forwards.linear_with_qv_update(x, weight, bias, z, B_q, B_v, heads)
        torch.testing.assert_close(got, want)
        g, inputs = torch.randn_like(want), (x, z, bias, B_q, B_v) + ((weight,) if weight_trains else ())
        for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
            torch.testing.assert_close(a, b)


def test_exactly_the_intended_parameters_train():
    """What trains in the model main() builds (common.build_model: inject, then the spare mask tokens'
    hypernetworks frozen)."""
    args, device, stock = tiny_model(["--rank", "3"])
    decoder = sum(p.numel() for p in stock.mask_decoder.parameters())
    spare = stock.mask_decoder.output_hypernetworks_mlps[2:]  # tokens 2, 3 make no mask with one class
    decoder -= sum(p.numel() for p in spare.parameters())
    no_mask = stock.prompt_encoder.no_mask_embed.weight.numel()
    model = common.build_model(args, device, lambda m: lora.inject(m, args.rank))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("mask_decoder.") or n == "prompt_encoder.no_mask_embed.weight"
               for n in names)
    assert not any(n.startswith("image_encoder.") and "lora_" not in n for n in names)
    trainable, _ = common.count_parameters(model)
    # tiny ViT: 2 blocks, d = 64: per block 2 paths of r * (64 + 64)
    assert lora.lora_parameter_count(model, 3) == 2 * 2 * 3 * (64 + 64)
    assert trainable == 2 * 2 * 3 * (64 + 64) + decoder + no_mask


def test_bad_rank_is_a_user_error():
    """inject says what does not fit (ValueError); main, through common.build_model, makes it a UserError:
    one sentence, exit status 2."""
    args, device, model = tiny_model()
    with pytest.raises(ValueError, match="--rank 0"):
        lora.inject(model, rank=0)
    with pytest.raises(ValueError, match="between 1 and 64"):
        lora.inject(model, rank=65)
    for rank, message in (("0", "--rank 0"), ("65", "between 1 and 64")):
        with pytest.raises(common.UserError, match=message):
            lora.main(["--model", "tiny", "--device", "cpu", "--rank", rank])


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    args, device, model = tiny_model()
    lora.inject(model, rank=4)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)  # as if trained
    common.save_checkpoint(tmp_path / "best.pt", model, args, step=0)
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # atomic_save's temporary file is gone
    x = torch.rand(2, 3, args.img_size, args.img_size)
    _, _, fresh = tiny_model()
    lora.inject(fresh, rank=4)
    common.load_checkpoint(tmp_path / "best.pt", fresh, args)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    saved = torch.load(tmp_path / "best.pt", weights_only=True)["state"]
    assert not any(k.startswith("image_encoder.") and "lora_" not in k for k in saved)  # frozen base not saved


def test_checkpoint_of_another_rank_is_refused(tmp_path):
    args, device, model = tiny_model()
    lora.inject(model, rank=4)
    common.save_checkpoint(tmp_path / "best.pt", model, args, step=0)
    _, _, other = tiny_model()
    lora.inject(other, rank=2)
    with pytest.raises(common.UserError, match="does not fit"):
        common.load_checkpoint(tmp_path / "best.pt", other, args)


def test_smoke_run_writes_metrics(tmp_path):
    metrics = lora.main(["--model", "tiny", "--device", "cpu", "--steps", "6", "--batch-size", "2",
                         "--out", str(tmp_path), "--run-name", "smoke"])
    run = tmp_path / "smoke"
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("method", "data", "model", "img_size", "seed", "dice", "hd95", "per_image", "trainable_params",
                "total_params", "peak_mem_gib", "train_seconds", "imgs_per_s", "args", "versions"):
        assert key in saved
    assert saved["method"] == "lora" and len(saved["per_image"]) == 6
    assert 0 <= metrics["dice"] <= 1
    for f in ("best.pt", "last.pt", "predictions.png", "curves.png"):
        assert (run / f).is_file()


def test_training_lowers_the_loss(tmp_path):
    """A frozen decoder, a detached loss or a broken augmentation would leave the loss where it started."""
    metrics = lora.main(["--model", "tiny", "--device", "cpu", "--steps", "40", "--batch-size", "4", "--lr", "3e-3",
                         "--warmup", "5", "--log-every", "5", "--out", str(tmp_path), "--run-name", "learn"])
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert losses[-1] < 0.93 * losses[0]


def test_tiled_prediction_equals_whole_image_for_a_local_model():
    """Zoom 2: overlapping tiles blended back must give what a local operator gives on the whole image."""
    class Local(nn.Module):
        img_size = 32

        def forward(self, x):  # (B, 3, 32, 32) -> (B, 2, 8, 8), like SAM's 4x smaller logits
            return F.avg_pool2d(x[:, :2], 4)
    images = torch.rand(3, 3, 64, 64)
    tiled = metrics.predict(Local(), images, batch_size=4)
    assert tiled.shape == (3, 2, 16, 16)
    assert torch.allclose(tiled, F.avg_pool2d(images[:, :2], 4), atol=1e-6)


def test_augment_crops_and_keeps_class_ids():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    masks = (torch.rand(4, 64, 64) < 0.3).to(torch.uint8) * 2
    x, y = common.augment(images, masks, g, size=32)
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 32, 32)
    assert set(y.unique().tolist()) <= {0, 2}
    assert 0 <= x.min() and x.max() <= 1


def test_multiclass_synthetic_trains(tmp_path):
    metrics = lora.main(["--model", "tiny", "--device", "cpu", "--num-classes", "2", "--steps", "4",
                         "--batch-size", "2", "--out", str(tmp_path), "--run-name", "mc"])
    assert metrics["args"]["num_classes"] == 2


def test_drive_loader(drive_root):
    args = lora.parse_args(["--data", "drive", "--data-root", str(drive_root), "--img-size", "256", "--zoom", "1"])
    train, test = load_data(args, torch.device("cpu"))
    assert len(train) == 14 and len(test) == 6
    assert train.names[0] == "21" and test.names == ["35", "36", "37", "38", "39", "40"]
    assert train.images.shape == (14, 3, 256, 256) and train.masks.shape == (14, 256, 256)
    assert test.orig_masks[0].shape == (584, 565) and test.fovs[0].shape == (584, 565)
    assert set(train.masks.unique().tolist()) == {0, 1}
    assert 0.05 < test.orig_masks[0].float().mean() < 0.2  # vessels are about 12% of a DRIVE image
    assert test.fovs[0].float().mean() > 0.6


def test_drive_auto_zoom(drive_root):
    args = lora.parse_args(["--data", "drive", "--data-root", str(drive_root), "--img-size", "256"])
    train, _ = load_data(args, torch.device("cpu"))
    assert args.zoom == 4  # 256/4 = 64-pixel masks need 4 tiles a side to reach 0.8 x 584
    assert train.images.shape[-1] == 1024 and train.input_size == 256



@pytest.mark.parametrize("name,size", [("tiny", 128), ("mobile_sam", 256)])
def test_encoder_equals_stock_with_b_a_added_to_the_q_and_v_rows(name, size, one_thread):
    """LoRA as its definition, over a whole encoder: with every A and B random, the adapted encoder gives
    what the stock encoder gives after W_q += B_q A_q and W_v += B_v A_v (scale 1, as SAMed) in every
    attention, the key rows untouched. The rows are located here from each layout (ViT: [q | k | v];
    TinyViT: per head [q_h | k_h | v_h]), not by lora.py. Random weights: tiny ViT (a windowed and a global
    block) and MobileSAM's TinyViT (10 attentions in 3 stages)."""
    args = lora.parse_args(["--model", name, "--checkpoint", "none", "--img-size", str(size), "--device", "cpu"])
    cli.setup(args, "lora", gpu_steps=10)
    model = common.load_sam(args, torch.device("cpu")).eval()
    stock = copy.deepcopy(model)
    lora.inject(model, rank=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=g)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        before = stock.image_encoder(x)
        wrapped = {n: m for n, m in model.image_encoder.named_modules() if isinstance(m, lora.LoRAQKV)}
        assert set(wrapped) == {n for n, _ in stock.image_encoder.named_modules() if n.endswith("attn.qkv")}
        for n, m in wrapped.items():
            W = stock.image_encoder.get_submodule(n).weight  # (3 * width, d), changed in place
            dq = m.lora_B_q.weight @ m.lora_A_q.weight  # (width, d)
            dv = m.lora_B_v.weight @ m.lora_A_v.weight
            if name == "tiny":  # ViT: rows [q | k | v]
                q, k, v = W.chunk(3)
            else:  # TinyViT: rows per head [q_h | k_h | v_h] (its attn_ratio is 1: three equal parts)
                heads = stock.image_encoder.get_submodule(n.removesuffix(".qkv")).num_heads
                q, k, v = W.unflatten(0, (heads, 3, -1)).unbind(1)  # (heads, width / heads, d) each
                dq, dv = dq.unflatten(0, (heads, -1)), dv.unflatten(0, (heads, -1))
            q += dq
            v += dv
        got, want = model.image_encoder(x), stock.image_encoder(x)
    assert (want - before).abs().max() > 1e-2  # the updates matter
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

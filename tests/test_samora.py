"""samora.py on the tiny random SAM, on the CPU: no-op start, layouts, trainable sets, stage-1 objectives,
experts saved and reloaded, and a smoke run of both stages."""
import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import common
import samora
from data import UserError, load_data
from fast.forwards import is_tokenwise
from test_fast import tokenwise_in_fact

BASE = ["--model", "tiny", "--device", "cpu", "--zoom", "1", "--synthetic-train", "8", "--synthetic-test", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two, and does not thrash when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stage1_images(expert, args, device):
    """Synthetic retinas for patch and pixel; for contrast between views, images that differ from each other
    as a whole (smooth random colour fields): the tiny random encoder's pooled features barely tell apart
    retinas, which differ only in their thin vessels."""
    if expert == "image":
        coarse = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        return nn.functional.interpolate(coarse, (128, 128), mode="bicubic").clamp(0, 1).half()
    return load_data(args, device)[0].images


def tiny(*extra):
    args = samora.parse_args(BASE + list(extra))
    device = cli.setup(args, "samora", gpu_steps=300)
    return args, device, common.load_sam(args, device)


def stock_decoder():
    """What the SAMed recipe trains on stock SAM: the mask decoder but the hypernetworks of the spare mask
    tokens (2 and 3 with one class), and no_mask_embed."""
    model = tiny()[2]
    params = {f"mask_decoder.{n}": p.numel() for n, p in model.mask_decoder.named_parameters()
              if not n.startswith(("output_hypernetworks_mlps.2.", "output_hypernetworks_mlps.3."))}
    return dict(params, **{"prompt_encoder.no_mask_embed.weight": model.prompt_encoder.no_mask_embed.weight.numel()})


def built(*extra):
    """The model main() builds (common.build_model: inject, then the spare mask tokens frozen)."""
    args, device, _ = tiny(*extra)
    return args, device, common.build_model(args, device, lambda m: samora.inject(m, args.rank, args.hl_width,
                                                                                  args.hl_heads))


def decoder_names():
    return set(stock_decoder())


def decoder_count():
    return sum(stock_decoder().values())


def expert(qkv, e):
    """Expert e's weights A_q, A_v, B_q, B_v."""
    return [getattr(qkv, f"samora_{e}_{name}").weight for name in ("A_q", "A_v", "B_q", "B_v")]


def randomise(model, key, scale=0.5, seed=1):
    """Fill every parameter whose name contains `key` with noise (so zero-initialised B's do something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def test_hl_attn_is_a_noop_at_init():
    args, device, model = tiny()
    stock = copy.deepcopy(model)
    samora.inject(model, args.rank, args.hl_width, args.hl_heads)
    for e in samora.EXPERTS:  # experts as after stage 1: non-zero updates
        randomise(model, f"samora_{e}_B", seed=len(e))
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = stock(x)
        assert torch.allclose(model(x), ref, atol=1e-6, rtol=0)  # stage 2 starts at stock SAM
        for e in samora.EXPERTS:  # ... although each expert alone changes the output
            samora.set_stage(model, e)
            assert (model(x) - ref).abs().max() > 1e-3
        samora.set_stage(model, "fused")
        randomise(model, "samora_hl.proj_out", scale=0.1)  # and HL-Attn is wired in
        assert (model(x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("heads", [None, 2])
def test_updates_reach_q_and_v_only_and_fusion_reads_the_expert_updates(heads):
    torch.manual_seed(0)
    W = 8  # q width: 2 heads of 4
    qkv = samora.SAMoraQKV(nn.Linear(6, 3 * W), rank=2, heads=heads, hl_width=8, hl_heads=2)
    randomise(qkv, "samora_", scale=0.5)
    x = torch.randn(3, 5, 6)  # (windows, tokens, d)
    base = nn.functional.linear(x, qkv.weight, qkv.bias)
    with torch.no_grad():
        for active in (*samora.EXPERTS, "fused"):
            qkv.active = active
            delta = qkv(x) - base
            # [q | k | v] for ViT, per head [q_h k_h v_h] for TinyViT
            parts = (delta.unflatten(-1, (3, W)) if heads is None  # (..., 3, W): q, k, v
                     else delta.unflatten(-1, (heads, 3, -1)).transpose(-3, -2).flatten(-2))
            assert parts[..., 1, :].abs().max() == 0
            assert parts[..., 0, :].abs().max() > 1e-3 and parts[..., 2, :].abs().max() > 1e-3
            if active != "fused":  # stage 1: the expert's own update, B_q A_q x and B_v A_v x
                Aq, Av, Bq, Bv = expert(qkv, active)
                assert torch.allclose(parts[..., 0, :], x @ Aq.T @ Bq.T, atol=1e-5)
                assert torch.allclose(parts[..., 2, :], x @ Av.T @ Bv.T, atol=1e-5)
                update = qkv.expert_update(active, x)  # [B_q A_q x | B_v A_v x]
                assert torch.allclose(update, torch.cat([x @ Aq.T @ Bq.T, x @ Av.T @ Bv.T], -1), atol=1e-5)
        # fused: HL-Attn of the three experts' explicit updates [B_q A_q x | B_v A_v x], image, patch, pixel
        hl = qkv.samora_hl
        u = [torch.cat([x @ Aq.T @ Bq.T, x @ Av.T @ Bv.T], -1) for Aq, Av, Bq, Bv in (expert(qkv, e) for e in samora.EXPERTS)]
        dq, dv = hl(*u).chunk(2, -1)
        assert torch.allclose(parts[..., 0, :], dq, atol=1e-5) and torch.allclose(parts[..., 2, :], dv, atol=1e-5)
        # which is P (proj_in, shared) on each, patch attending to pixel, image to the result, then proj_out
        image, patch, pixel = (p @ hl.proj_in.weight.T for p in u)
        fused = hl.proj_out(hl.norm(hl.image_from_low(image, hl.patch_from_pixel(patch, pixel))))
        assert torch.allclose(torch.cat([dq, dv], -1), fused, atol=1e-5)


def test_trainable_sets_of_both_stages():
    args, device, model = built()
    names = [n for n, _ in model.named_parameters()]
    attns = samora.encoder_attentions(model.image_encoder)
    r, w = args.rank, args.hl_width
    per_expert = sum(2 * r * (a.qkv.in_features + a.qkv.out_features // 3) for a, _ in attns)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if ".samora_hl." in n} | decoder_names()  # as built: stage 2's set
    for e in samora.EXPERTS:
        model.samora_head = samora.stage1_head(e, model.prompt_encoder.embed_dim)
        samora.set_stage(model, e)
        head = {"samora_head." + n for n, _ in model.samora_head.named_parameters()}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n in names if f".samora_{e}_" in n} | head
        assert common.count_parameters(model)[0] == per_expert + sum(p.numel() for p in model.samora_head.parameters())
        del model.samora_head
    samora.set_stage(model, "fused")  # stage 2 after stage 1, as stage_one leaves it
    common.freeze_spare_mask_tokens(model)  # as cli.run does after the pre-training stage
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if ".samora_hl." in n} | decoder_names()
    # HL-Attn per attention, counted layer by layer: proj_in (2W -> w, no bias); two cross-attentions, each
    # two LayerNorms (2w each) and q (w -> w), kv (w -> 2w), out (w -> w) with biases; LayerNorm; proj_out (w -> 2W)
    hl = 0
    for a, _ in attns:
        W = a.qkv.out_features // 3
        cross = 2 * (2 * w) + (w * w + w) + (w * 2 * w + 2 * w) + (w * w + w)
        hl += 2 * W * w + 2 * cross + 2 * w + (w * 2 * W + 2 * W)
    hl_params = sum(p.numel() for n, p in model.named_parameters() if ".samora_hl." in n)
    assert hl_params == hl == samora.hl_parameter_count(model, w)
    assert common.count_parameters(model)[0] == hl + decoder_count()


def test_only_single_experts_let_windowed_blocks_skip_the_padding():
    """fast.forwards.is_tokenwise, which lets a windowed ViT block skip stock's window padding, must hold
    exactly when the qkv maps each token alone and a zero token to the bias: a single expert (stage 1) does;
    HL-Attn's fusion (stage 2) attends across the tokens, so changing one token changes the others' update."""
    args, device, model = tiny()
    samora.inject(model, args.rank, args.hl_width, args.hl_heads)
    qkv = samora.encoder_attentions(model.image_encoder)[0][0].qkv
    g = torch.Generator().manual_seed(0)
    for name, p in qkv.named_parameters():
        if "_B_" in name or "proj_out" in name:  # zero at init, which would hide the updates
            p.data.copy_(torch.randn(p.shape, generator=g))
    for stage, tokenwise in ((samora.EXPERTS[0], True), ("fused", False)):
        qkv.active = stage
        assert is_tokenwise(qkv, 4) == tokenwise == tokenwise_in_fact(qkv), stage


@pytest.mark.parametrize("expert", samora.EXPERTS)
def test_stage1_objective_falls(expert, tmp_path):
    args, device, model = tiny("--stage1-steps", "30", "--log-every", "1", "--batch-size", "8", "--stage1-lr", "3e-3")
    samora.inject(model, args.rank, args.hl_width, args.hl_heads)
    before = samora.expert_state(model)
    history = samora.pretrain_expert(model, stage1_images(expert, args, device), expert, args, device, tmp_path)
    losses = [loss for _, loss in history["loss"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    after = samora.expert_state(model)
    for k in before:  # only this expert moved (its B left zero), the others are untouched
        assert torch.equal(before[k], after[k]) != (f"samora_{expert}_" in k), k
    assert not hasattr(model, "samora_head")  # the stage-1 head is thrown away


@pytest.mark.parametrize("expert", ["image", "patch"])
def test_teacher_distillation_falls(expert, tmp_path):
    teacher = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=4)))
    teacher.save(str(tmp_path / "teacher.pt"))  # (B, 3, 128, 128) -> (B, 16, 8, 8) features
    args, device, model = tiny("--stage1-steps", "30", "--log-every", "1", "--batch-size", "8", "--stage1-lr", "3e-3")
    samora.inject(model, args.rank, args.hl_width, args.hl_heads)
    history = samora.pretrain_expert(model, stage1_images("image", args, device), expert, args, device, tmp_path,
                                     samora.load_teacher(tmp_path / "teacher.pt", device))
    losses = [loss for _, loss in history["loss"]]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_experts_saved_and_reloaded_give_identical_outputs(tmp_path):
    args, device, model = tiny()
    samora.inject(model, args.rank, args.hl_width, args.hl_heads)
    randomise(model, "samora_", scale=0.3)
    samora.save_experts(tmp_path / "experts.pt", model, args, {"note": "test"})
    saved = torch.load(tmp_path / "experts.pt", weights_only=True)["state"]
    assert saved and all(any(f".samora_{e}_" in k for e in samora.EXPERTS) for k in saved)  # experts only
    args2, _, fresh = tiny()
    samora.inject(fresh, args2.rank, args2.hl_width, args2.hl_heads)
    assert samora.load_experts(tmp_path / "experts.pt", fresh, args2) == {"note": "test"}
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for e in samora.EXPERTS:
            samora.set_stage(model, e)
            samora.set_stage(fresh, e)
            assert torch.equal(model(x), fresh(x))
    args3, _, other = tiny("--rank", "2")
    samora.inject(other, args3.rank)
    with pytest.raises(UserError):
        samora.load_experts(tmp_path / "experts.pt", other, args3)


def test_smoke_both_stages_then_stage_2_alone(tmp_path):
    argv = BASE + ["--steps", "3", "--stage1-steps", "3", "--label-fraction", "0.5", "--out", str(tmp_path)]
    metrics = samora.main(argv + ["--stage", "both", "--run-name", "both"])
    experts = tmp_path / "both" / "experts.pt"
    assert experts.is_file() and (tmp_path / "both" / "metrics.json").is_file()
    assert len(metrics["labelled"]) == 4 and set(metrics["stage1"]["experts"]) == set(samora.EXPERTS)
    assert metrics["trainable_params"] == metrics["hl_params"] + decoder_count()
    metrics = samora.main(argv + ["--stage", "2", "--experts", str(experts), "--run-name", "two"])
    assert 0 <= metrics["dice"] <= 1 and metrics["stage1"]["steps_per_expert"] == 3
    with pytest.raises(UserError):
        samora.main(argv + ["--stage", "2"])


def cross_attention_by_formula(ca, x, y):
    """The fusion step written out: x + out(softmax(q k^T / sqrt(d)) v) over the tokens, per head, with
    q = W_q LN(x) and [k | v] = W_kv LN(y). x, y (B', T, w)."""
    def norm(t, ln):
        return F.layer_norm(t, t.shape[-1:], ln.weight, ln.bias, ln.eps)

    def heads(t):
        return t.unflatten(-1, (ca.heads, -1)).transpose(1, 2)  # (B', heads, T, w / heads)
    q = heads(F.linear(norm(x, ca.norm_x), ca.q.weight, ca.q.bias))
    k, v = map(heads, F.linear(norm(y, ca.norm_y), ca.kv.weight, ca.kv.bias).chunk(2, -1))
    weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)  # (B', heads, T, T)
    return x + ca.out((weights @ v).transpose(1, 2).flatten(2))


def q_k_v(delta, heads, width):
    """A qkv output's change split into (..., 3, width): q, k, v ([q | k | v], or per head [q_h k_h v_h])."""
    if heads is None:
        return delta.unflatten(-1, (3, width))
    return delta.unflatten(-1, (heads, 3, -1)).transpose(-3, -2).flatten(-2)


def fused_layer(heads, seed=0):
    """A stage-2 SAMoraQKV (d 6, q width 8) with every expert and all of HL-Attn random."""
    torch.manual_seed(seed)
    qkv = samora.SAMoraQKV(nn.Linear(6, 24), rank=2, heads=heads, hl_width=8, hl_heads=2)
    randomise(qkv, "samora_", scale=0.5, seed=seed + 1)
    qkv.active = "fused"
    return qkv


@pytest.mark.parametrize("heads", [None, 2])
def test_fused_update_is_patch_attending_to_pixel_then_image_attending_to_that(heads):
    """Stage 2 against HL-Attn written out, each expert's update taken by its parameter names (not by
    samora.EXPERTS' order): low = patch + attention(patch -> pixel), high = image + attention(image -> low),
    update = proj_out(LN(high)) on q and v. Swapping two experts, or dropping one, fails here; and changing
    any one expert's weights changes the fused update."""
    qkv = fused_layer(heads)
    hl = qkv.samora_hl
    x = torch.randn(3, 2, 5, 6) if heads is None else torch.randn(3, 10, 6)  # ViT (B', h, w, d); TinyViT (B', T, d)
    with torch.no_grad():
        got = q_k_v(qkv(x) - F.linear(x, qkv.weight, qkv.bias), heads, 8)
        u = {}
        for e in ("image", "patch", "pixel"):
            A_q, A_v, B_q, B_v = expert(qkv, e)
            update = torch.cat([x @ A_q.T @ B_q.T, x @ A_v.T @ B_v.T], -1)  # [B_q A_q x | B_v A_v x]
            u[e] = (update @ hl.proj_in.weight.T).flatten(1, -2)  # P, shared: (B', T, w)
        low = cross_attention_by_formula(hl.patch_from_pixel, u["patch"], u["pixel"])
        high = cross_attention_by_formula(hl.image_from_low, u["image"], low)
        out = hl.proj_out(F.layer_norm(high, high.shape[-1:], hl.norm.weight, hl.norm.bias, hl.norm.eps))
        dq, dv = out.reshape(*x.shape[:-1], -1).chunk(2, -1)
        torch.testing.assert_close(got[..., 0, :], dq, atol=1e-5, rtol=1e-5)
        assert got[..., 1, :].abs().max() == 0  # k untouched
        torch.testing.assert_close(got[..., 2, :], dv, atol=1e-5, rtol=1e-5)
        for e in ("image", "patch", "pixel"):
            B_q = getattr(qkv, f"samora_{e}_B_q").weight
            saved = B_q.clone()
            B_q.add_(torch.randn(B_q.shape))
            moved = (q_k_v(qkv(x) - F.linear(x, qkv.weight, qkv.bias), heads, 8) - got).abs().max()
            B_q.copy_(saved)
            assert moved > 1e-3, e


def test_fusion_attends_within_each_window_only():
    """HL-Attn fuses over the tokens one frozen attention sees: a token's fused update depends on the other
    tokens of its window, never on another window or another image of the batch (the first dimension)."""
    qkv = fused_layer(None)
    x = torch.randn(4, 3, 3, 6)  # 4 windows of 3 x 3 tokens
    with torch.no_grad():
        ref = qkv(x)
        other = x.clone()
        other[1] += torch.randn(3, 3, 6)  # another window changes
        changed = qkv(other)
        torch.testing.assert_close(changed[[0, 2, 3]], ref[[0, 2, 3]], atol=1e-6, rtol=0)
        same = x.clone()
        same[0, 2, 2] += torch.randn(6)  # another token of window 0 changes
        assert (qkv(same)[0, 0, 0] - ref[0, 0, 0]).abs().max() > 1e-4


def test_hl_attn_sizes_in_the_docstring():
    """The module docstring's sizes: this file's HL-Attn at --hl-width 32 on ViT-B and MobileSAM (counted
    after inject), and the released HL-Attn at width 768 on ViT-B's 12 blocks (rebuilt from its description:
    two cross-attention fusions, each LayerNorms on q, k and v, nn.MultiheadAttention(768, 8) and an extra
    output Linear; a final LayerNorm; two scalar gates)."""
    stated = re.search(r"ViT-B:\s+([\d.]+)\s+M\s+HL-Attn\s+parameters;\s+MobileSAM:\s+([\d.]+)\s+M", samora.__doc__)
    counts = []
    for name, size in (("vit_b", 1024), ("mobile_sam", 1024)):
        with torch.device("meta" if name == "vit_b" else "cpu"):  # TinyViT's constructor reads values
            model = common.PromptFreeSam(*common.build_sam_parts(name, size, 1), name, size, 1)
        samora.inject(model, 4, 32, 4)
        hl = sum(p.numel() for n, p in model.named_parameters() if ".samora_hl." in n)
        assert hl == samora.hl_parameter_count(model, 32)
        counts.append(round(hl / 1e6, 2))
    assert counts == [float(stated[1]), float(stated[2])]

    def fusion(dim=768):
        return nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim),
                              nn.MultiheadAttention(dim, 8, batch_first=True), nn.Linear(dim, dim)])
    with torch.device("meta"):
        released = nn.ModuleList([fusion(), fusion(), nn.LayerNorm(768)])
    per_block = sum(p.numel() for p in released.parameters()) + 2  # + the gates
    stated = re.search(r"width\s+768\s+\(about\s+(\d+)\s+M\s+parameters\s+for\s+ViT-B\)", samora.__doc__)
    assert round(12 * per_block / 1e6) == int(stated[1])


def test_stage_two_runs_lora_py_steps_for_several_classes(monkeypatch):
    """300 stage-2 steps on a GPU for one class (DRIVE's table), 1000 for several (JSRT, seed 0: Dice 0.914 at
    300, 0.933 at 1000)."""
    budget = {}
    monkeypatch.setattr(cli, "main", lambda args, method, **kw: budget.setdefault(args.num_classes, kw["gpu_steps"]))
    for num_classes in (1, 5):
        samora.main(["--model", "tiny", "--num-classes", str(num_classes)])
    assert budget == {1: 300, 5: 1000}

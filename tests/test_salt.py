"""SALT (salt.py) on the tiny model, CPU: exact no-op at initialisation, the layer against the paper's formula,
the trainable set and its count against 2r + 2(R-r)*rank, the regulariser, the eval cache, checkpoints,
and smoke runs of main()."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import cli
import common
import salt


def build(*argv):
    args = salt.parse_args(["--model", "tiny", "--device", "cpu", *argv])
    device = cli.setup(args, "salt", gpu_steps=10)
    return args, common.load_sam(args, device)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors run faster on one thread, and far faster on a shared, busy CPU (the SVDs of inject() took
    0.3 s each with 2 threads under load, 5 ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def perturb(model, scale=0.3):
    """Move every SALT parameter away from its initial value (seeded)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "salt_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def target_names(stock):
    """The layers SALT must adapt in the tiny ViT, listed from the stock model's own module names."""
    names = [n for n, _ in stock.image_encoder.named_modules()
             if n.endswith(("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2"))]
    return names + ["neck.0", "neck.2"]


@pytest.mark.parametrize("relu", ["sigma", "top"])
def test_noop_at_initialisation(images, relu):
    args, model = build("--relu", relu)
    stock = copy.deepcopy(model)
    salt.inject(model, args)
    with torch.no_grad():
        for mode in (True, False):  # training (W~ rebuilt each forward) and eval (W~ cached)
            model.train(mode), stock.train(mode)
            assert torch.equal(model(images), stock(images))  # bit-exact: the change of W is exactly 0


def test_weight_is_w_when_a1_b0_xy0():
    args, model = build("--rank", "2")
    salt.inject(model, args)
    for m in salt.salt_layers(model):
        W = m.weight.reshape(m.weight.shape[0], -1)
        # the SVD reconstructs the frozen weight
        assert torch.allclose(m.salt_U @ torch.diag(m.salt_S) @ m.salt_Vt, W, atol=1e-5)
        with torch.no_grad():
            m.salt_scale.fill_(1), m.salt_shift.zero_()
            m.salt_X.normal_(), m.salt_Y.zero_()  # X Y = 0 with X != 0
        assert torch.equal(m.adapted_weight(), m.weight)
        with torch.no_grad():
            m.salt_X.zero_(), m.salt_Y.normal_()  # X Y = 0 with Y != 0
        assert torch.equal(m.adapted_weight(), m.weight)


@pytest.mark.parametrize("relu", ["sigma", "top"])
def test_weight_matches_paper_formula(relu):
    """W~ = U ReLU(Sigma') Vt built from the definition, with all parameters moved (large enough that the
    ReLU cuts entries of X Y and that some scaled singular values go negative)."""
    args, model = build("--relu", relu, "--rank", "3")
    salt.inject(model, args)
    perturb(model, scale=1.0)
    with torch.no_grad():
        for m in salt.salt_layers(model):
            r, s = m.top, m.salt_S
            R = s.numel()
            sigma = torch.zeros(R, R)
            sigma[:r, :r] = torch.diag(m.salt_scale * s[:r] + m.salt_shift)
            sigma[r:, r:] = torch.diag(s[r:]) + m.salt_X @ m.salt_Y
            if relu == "sigma":
                sigma = F.relu(sigma)  # the paper: ReLU over the whole matrix
            else:
                sigma[:r, :r] = F.relu(sigma[:r, :r])  # ours: only the scaled and shifted top values
            expected = (m.salt_U @ sigma @ m.salt_Vt).view_as(m.weight)
            assert torch.allclose(m.adapted_weight(), expected, atol=1e-5)
            assert not torch.allclose(m.adapted_weight(), m.weight, atol=1e-3)


@pytest.mark.parametrize("flags", [["--rank", "4"], ["--rank", "256"], ["--s-sam"]])
def test_trainable_set_and_count(flags):
    """What trains in the model main() builds (common.build_model: inject, then the spare mask tokens'
    hypernetworks frozen)."""
    args, stock = build(*flags)
    model = common.build_model(args, torch.device("cpu"), lambda m: salt.inject(m, args))
    fractions = {"attn": 0.99, "mlp": 0.065, "neck": 0.977}  # the defaults, 760/768, 50/768, 250/256
    expected_salt, expected_names = 0, set()
    for name in target_names(stock):
        w = stock.image_encoder.get_submodule(name).weight
        R = min(w.shape[0], w[0].numel())
        kind = "neck" if name.startswith("neck") else name.split(".")[-2]
        if args.s_sam:
            r, rank = R, 0
        else:
            r = round(fractions[kind] * R)
            rank = min(args.rank, R - r)  # clamped where R - r is smaller
        expected_salt += 2 * r + 2 * (R - r) * rank
        params = ["salt_scale", "salt_shift"] + (["salt_X", "salt_Y"] if rank else [])
        expected_names |= {f"image_encoder.{name}.{p}" for p in params}
        m = model.image_encoder.get_submodule(name)
        assert isinstance(m, salt.SALTMixin) and m.salt_scale.shape == (r,)
        if rank:
            assert m.salt_X.shape == (R - r, rank) and m.salt_Y.shape == (rank, R - r)
    norms = {f"image_encoder.{n}" for n, _ in stock.image_encoder.named_parameters() if ".norm" in n}
    # the decoder part is lora.py's (SAMed's): the mask decoder but the hypernetworks of the spare mask tokens
    # (2 and 3 with one class), and the no-mask embedding
    decoder = {f"mask_decoder.{n}" for n, _ in stock.mask_decoder.named_parameters()
               if not n.startswith(("output_hypernetworks_mlps.2.", "output_hypernetworks_mlps.3."))}
    decoder.add("prompt_encoder.no_mask_embed.weight")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_names | norms | decoder
    params = dict(stock.named_parameters())
    extra = sum(params[n].numel() for n in norms | decoder)
    assert salt.salt_parameter_count(model) == expected_salt
    assert common.count_parameters(model)[0] == expected_salt + extra
    # the frozen weights keep SAM's names, and the SVD factors stay out of the state dict
    assert stock.state_dict().keys() <= model.state_dict().keys()
    assert not any(k.endswith(("salt_U", "salt_S", "salt_Vt", "salt_cache")) for k in model.state_dict())


def test_top_count_and_errors():
    assert [salt.top_count(f, R) for f, R in ((0.99, 768), (0.065, 768), (0.977, 256))] == [760, 50, 250]
    assert salt.top_count(760, 768) == 760 and salt.top_count(760, 128) == 128  # counts, clamped to R
    with pytest.raises(ValueError, match="--top-\\* value 2.5"):
        salt.top_count(2.5, 768)
    args, model = build("--rank", "0")
    with pytest.raises(ValueError, match="--rank 0"):  # inject says what does not fit
        salt.inject(model, args)
    for flags, message in ((["--rank", "0"], "--rank 0"), (["--top-mlp", "2.5"], "2.5")):  # main: a UserError
        with pytest.raises(common.UserError, match=message):
            salt.main(["--model", "tiny", "--device", "cpu", *flags])


def test_regulariser_zero_at_init_and_grows():
    args, model = build()
    salt.inject(model, args)
    reg = salt.salt_regulariser(model)
    assert reg.item() == 0.0
    reg.backward()  # the norm at 0 has a finite (zero) gradient: no NaN on the first step
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if "salt_" in n)
    m = salt.salt_layers(model)[0]
    with torch.no_grad():
        m.salt_scale[0] += 0.5  # ||a*s + b - s|| = 0.5 * s_0
    assert torch.allclose(salt.salt_regulariser(model), 0.5 * m.salt_S[0])
    values = []
    for scale in (0.01, 0.1, 1.0):
        _, fresh = build()
        salt.inject(fresh, args)
        perturb(fresh, scale)
        values.append(salt.salt_regulariser(fresh).item())
    assert 0 < values[0] < values[1] < values[2]


def test_eval_cache_follows_parameters(images):
    args, model = build()
    salt.inject(model, args)
    perturb(model)
    with torch.no_grad():
        model.train()
        trained = model(images)
        model.eval()
        assert torch.allclose(model(images), trained, atol=1e-6)  # cache = the training-mode weight
        # loading other adapter parameters while in eval mode refreshes the cache
        state = {k: torch.zeros_like(v) if k.endswith("salt_Y") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        cached = model(images)
        model.train()
        assert torch.allclose(cached, model(images), atol=1e-6)
        assert not torch.allclose(cached, trained, atol=1e-4)


def test_training_lowers_loss_and_checkpoint_reloads(tmp_path, images):
    args, model = build("--rank", "4", "--lr", "3e-3")
    salt.inject(model, args)
    masks = (images[:, 0] > 0.5).to(torch.uint8)  # a learnable target: the red channel thresholded
    loss_fn = salt.make_loss(args.reg_weight)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for _ in range(8):
        loss = loss_fn(model, images, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert salt.salt_regulariser(model).item() > 0  # the adapter moved
    common.save_checkpoint(tmp_path / "c.pt", model, args)
    args2, fresh = build("--rank", "4")
    salt.inject(fresh, args2)
    common.load_checkpoint(tmp_path / "c.pt", fresh, args2)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(images), model(images), atol=1e-6)
    state = torch.load(tmp_path / "c.pt", weights_only=True)["state"]
    assert any("salt_X" in k for k in state) and not any(k.endswith("salt_U") for k in state)


@pytest.mark.parametrize("flags", [[], ["--s-sam"]])
def test_main_smoke(tmp_path, flags, monkeypatch):
    trained_with = []  # the regulariser weight of every training loss main computes

    def recording_make_loss(reg_weight, make_loss=salt.make_loss):
        loss_fn = make_loss(reg_weight)

        def recorded(*batch):
            trained_with.append(reg_weight)
            return loss_fn(*batch)
        return recorded
    monkeypatch.setattr(salt, "make_loss", recording_make_loss)
    out = salt.main(["--model", "tiny", "--device", "cpu", "--steps", "4", "--log-every", "2", "--synthetic-train", "4",
                     "--synthetic-test", "2", "--out", str(tmp_path), "--reg-weight", "0.05", *flags])
    name = "ssam_synthetic_tiny_s0" if flags else "salt_synthetic_tiny_s0"
    metrics = json.loads((tmp_path / name / "metrics.json").read_text())
    assert 0 <= out["dice"] <= 1 and metrics["salt_params"] == out["salt_params"] > 0
    assert len(trained_with) >= 4 and set(trained_with) == {0.05}  # main trains on make_loss(--reg-weight)
    assert (tmp_path / name / "best.pt").is_file() and (tmp_path / name / "last.pt").is_file()


def test_tinyvit_targets():
    """MobileSAM's TinyViT (random weights, no SVD): 10 attention blocks x 4 layers + 2 neck convs."""
    encoder, _, _ = common.build_sam_parts("mobile_sam", 1024, 1)
    targets = salt.salt_targets(encoder)
    assert len(targets) == 10 * 4 + 2
    assert [getattr(p, n).__class__.__name__ for _, p, n in targets[:4]] == ["Linear"] * 4
    assert [n for _, _, n in targets[:4]] == ["qkv", "proj", "fc1", "fc2"]
    neck = [getattr(p, n) for k, p, n in targets if k == "neck"]
    assert [c.kernel_size for c in neck] == [(1, 1), (3, 3)] and neck[0].in_channels == 320


def known_spectrum_layer(D=12, K=10, seed=0):
    """nn.Linear(K, D) whose weight is Q1 diag(s) Q2^T with s = 10, 9, ..., 1 (R = 10): singular values and
    directions known without an SVD. Returns the layer, Q1 (D, R), s (R,), Q2 (K, R)."""
    g = torch.Generator().manual_seed(seed)
    R = min(D, K)
    Q1 = torch.linalg.qr(torch.randn(D, R, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(K, R, generator=g, dtype=torch.float64))[0]
    s = torch.arange(R, 0, -1, dtype=torch.float64)
    layer = torch.nn.Linear(K, D)
    with torch.no_grad():
        layer.weight.copy_((Q1 * s) @ Q2.T)
    return layer, Q1, s, Q2


@pytest.mark.parametrize("relu", ["sigma", "top"])
def test_scale_and_shift_act_on_the_largest_singular_values(relu):
    """The paper's a and b belong to the top r singular values. On a weight of known spectrum
    (10, 9, ..., 1), scale 2 and 0.5 and a shift of 0.25 on the first three give 20, 4.5 and 8.25 on the
    directions of 10, 9 and 8, and nothing else moves; an SVD kept in ascending order, or the last r values
    picked, would move 1, 2 and 3 instead. Then every SALT layer of the tiny model: its s are the weight's
    singular values, largest first, and a change of a[0] alone moves W by a rank-1 matrix of norm s_max."""
    layer, Q1, s, Q2 = known_spectrum_layer()
    m = salt.SALTLinear(layer, top=3, rank=2, relu=relu)
    with torch.no_grad():
        m.salt_scale.copy_(torch.tensor([2.0, 0.5, 1.0]))
        m.salt_shift.copy_(torch.tensor([0.0, 0.0, 0.25]))
    new_top = torch.tensor([20.0, 4.5, 8.25], dtype=torch.float64)
    want = (Q1[:, :3] * new_top) @ Q2[:, :3].T + (Q1[:, 3:] * s[3:]) @ Q2[:, 3:].T
    torch.testing.assert_close(m.adapted_weight().detach().double(), want, atol=1e-5, rtol=0)

    args, model = build("--relu", relu)
    salt.inject(model, args)
    for m in salt.salt_layers(model):
        W = m.weight.detach().reshape(m.weight.shape[0], -1).double()
        torch.testing.assert_close(m.salt_S.double(), torch.linalg.svdvals(W), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            m.salt_scale[0] = 2.0  # a * s_max + b - s_max = s_max
        change = torch.linalg.svdvals((m.adapted_weight().detach() - m.weight).reshape_as(W).double())
        torch.testing.assert_close(change[0], torch.linalg.svdvals(W)[0], atol=1e-4, rtol=1e-4)
        assert change[1] < 1e-4 * change[0]  # rank 1: one singular direction moved


@pytest.mark.parametrize("relu", ["sigma", "top"])
def test_low_rank_update_lives_in_the_other_singular_directions(relu):
    """X Y acts in the (R-r) x (R-r) block of Sigma, the directions of the R - r smallest singular values:
    with a = 1 and b = 0 the change of W is orthogonal to the top r directions on both sides, and in the
    basis of the other directions it is X Y (--relu top) or ReLU(diag(s_rest) + X Y) - diag(s_rest) (sigma).
    Compared in absolute value, since the SVD may flip the sign of a pair of singular vectors."""
    layer, Q1, s, Q2 = known_spectrum_layer()
    m = salt.SALTLinear(layer, top=3, rank=2, relu=relu)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        m.salt_X.copy_(torch.randn(m.salt_X.shape, generator=g))
        m.salt_Y.copy_(2 * torch.randn(m.salt_Y.shape, generator=g))  # large enough that ReLU cuts entries
    change = (m.adapted_weight() - m.weight).detach().double()
    assert change.abs().max() > 0.5
    torch.testing.assert_close(Q1[:, :3].T @ change, torch.zeros(3, 10, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(change @ Q2[:, :3], torch.zeros(12, 3, dtype=torch.float64), atol=1e-5, rtol=0)
    XY = (m.salt_X @ m.salt_Y).detach().double()
    block = XY if relu == "top" else F.relu(torch.diag(s[3:]) + XY) - torch.diag(s[3:])
    if relu == "sigma":
        assert (torch.diag(s[3:]) + XY < 0).any()  # the ReLU did cut something
    torch.testing.assert_close((Q1[:, 3:].T @ change @ Q2[:, 3:]).abs(), block.abs(), atol=1e-5, rtol=0)


def test_low_rank_part_starts_at_zero_from_the_stated_x_bound():
    """Y = 0 (X Y = 0 at step 0) and X uniform in +-sqrt(6 / (21 rank)), as the module docstring says."""
    torch.manual_seed(0)
    rank = 4
    m = salt.SALTLinear(torch.nn.Linear(300, 300), top=10, rank=rank)
    assert torch.equal(m.salt_Y, torch.zeros_like(m.salt_Y))
    bound = (6 / (21 * rank)) ** 0.5
    assert 0.97 * bound < m.salt_X.abs().max().item() <= bound


def test_s_sam_layer_is_u_relu_of_a_s_plus_b_vt():
    """--s-sam: every singular value scaled and shifted, no low-rank part, W~ = U diag(ReLU(a*s + b)) Vt,
    against an SVD of the layer's own weight computed here, with a and b moved far enough that some a*s + b
    are negative; its regulariser is ||a*s + b - s|| summed over layers."""
    args, model = build("--s-sam")
    salt.inject(model, args)
    perturb(model, scale=1.0)
    negative, reg = 0, 0.0
    with torch.no_grad():
        for m in salt.salt_layers(model):
            W = m.weight.reshape(m.weight.shape[0], -1).double()
            U, s, Vt = torch.linalg.svd(W, full_matrices=False)
            assert m.top == s.numel() and m.rank == 0 and not hasattr(m, "salt_X")
            a, b = m.salt_scale.double(), m.salt_shift.double()
            want = U @ torch.diag(F.relu(a * s + b)) @ Vt
            torch.testing.assert_close(m.adapted_weight().reshape_as(W).double(), want, atol=1e-5, rtol=0)
            negative += int((a * s + b < 0).sum())
            reg += torch.linalg.vector_norm(a * s + b - s).item()
    assert negative > 0  # the ReLU was exercised
    assert salt.salt_regulariser(model).item() == pytest.approx(reg, rel=1e-5)


def test_regulariser_is_part_of_the_training_loss(images):
    """make_loss gives the segmentation loss plus reg_weight x (sum over layers of ||a*s_top + b - s_top||
    + ||X Y||_F), the singular values taken from the layers' own weights here; the gradient of the
    regulariser reaches a, b, X and Y; --reg-weight defaults to the released config's 0 (paper: 0.01)."""
    assert salt.parse_args([]).reg_weight == 0
    args, model = build("--reg-weight", "0.5")
    salt.inject(model, args)
    perturb(model)
    masks = (images[:, 0] > 0.5).to(torch.uint8)
    reg = 0
    for m in salt.salt_layers(model):
        s = torch.linalg.svdvals(m.weight.detach().reshape(m.weight.shape[0], -1).double())[:m.top].float()
        reg = reg + torch.linalg.vector_norm(m.salt_scale * s + m.salt_shift - s)
        reg = reg + torch.linalg.matrix_norm(m.salt_X @ m.salt_Y)
    model.train()
    seg = common.segmentation_loss(model(images), masks)
    loss = salt.make_loss(args.reg_weight)(model, images, masks)
    assert reg.item() > 0.1
    torch.testing.assert_close(loss - seg, 0.5 * reg, atol=1e-4, rtol=1e-4)
    m = salt.salt_layers(model)[2]  # the first MLP layer: top values and a low-rank part
    grads = torch.autograd.grad(loss - seg, [m.salt_scale, m.salt_shift, m.salt_X, m.salt_Y])
    assert all(g.abs().max() > 0 for g in grads)


def test_vit_b_counts_in_the_docstring():
    """The module docstring's ViT-B counts at rank 256 (the authors' setting): 8.97 M SALT parameters
    without the clamp of the low-rank size to R - r (the authors' code), 8.87 M with it (this file). Shapes
    only: the model is built on the meta device, where the SVD costs nothing."""
    import re
    with torch.device("meta"):
        parts = common.build_sam_parts("vit_b", 512, 1)
        model = common.PromptFreeSam(*parts, "vit_b", 512, 1)
    args = salt.parse_args(["--rank", "256"])
    salt.inject(model, args)
    unclamped = sum(2 * m.top + 2 * (m.salt_S.numel() - m.top) * 256 for m in salt.salt_layers(model))
    stated = re.search(r"its\s+SALT\s+parts\s+count\s+([\d.]+)\s+M,\s+this\s+file's\s+([\d.]+)\s+M", salt.__doc__)
    assert (float(stated[1]), float(stated[2])) == (round(unclamped / 1e6, 2),
                                                    round(salt.salt_parameter_count(model) / 1e6, 2))

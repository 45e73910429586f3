"""Using a trained adapter: resume after an interruption, predict on a folder, export merged weights."""
import numpy as np
import pytest
import torch
from PIL import Image

import common
import lora
from data import load_data


def setup_tiny(tmp_path, extra=()):
    args = lora.parse_args(["--model", "tiny", "--device", "cpu", "--steps", "10", "--batch-size", "2",
                            "--warmup", "3", "--log-every", "2", "--out", str(tmp_path), *extra])
    device = common.setup(args, "lora", gpu_steps=10)
    model = common.load_sam(args, device)
    lora.inject(model, args.rank)
    return args, device, model


def train(tmp_path, name, interrupt_at=None, resume=None):
    args, device, model = setup_tiny(tmp_path)
    ckpt = common.load_checkpoint(resume, model, args) if resume else None
    train_set, _ = load_data(args, device)
    calls = [0]

    def loss_fn(m, x, y):
        calls[0] += 1
        if calls[0] == interrupt_at:
            raise KeyboardInterrupt  # as if Ctrl-C arrived in the middle of a step
        return common.default_loss(m, x, y)
    common.train_loop(model, common.labelled_batches(train_set, args.batch_size, args.generator), loss_fn, args,
                      device, tmp_path / name, args.steps, resume=ckpt)
    return model


def test_interrupted_and_resumed_run_ends_with_the_same_parameters(tmp_path):
    straight = train(tmp_path, "straight")
    with pytest.raises(SystemExit) as stop:
        train(tmp_path, "interrupted", interrupt_at=6)  # steps 1-5 done, the 6th interrupted
    assert stop.value.code == 130
    saved = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)
    assert saved["step"] == 5
    resumed = train(tmp_path, "resumed", resume=tmp_path / "interrupted" / "last.pt")
    a, b = dict(straight.named_parameters()), dict(resumed.named_parameters())
    for name, p in a.items():
        if p.requires_grad:
            assert torch.equal(p, b[name]), name


def test_checkpoint_from_another_method_or_model_is_refused(tmp_path):
    args, device, model = setup_tiny(tmp_path)
    common.save_checkpoint(tmp_path / "x.pt", model, args)
    args.method = "salt"
    with pytest.raises(common.UserError, match="run lora.py"):
        common.load_checkpoint(tmp_path / "x.pt", model, args)
    args.method, args.num_classes = "lora", 3
    with pytest.raises(common.UserError, match="--num-classes 1"):
        common.load_checkpoint(tmp_path / "x.pt", model, args)
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_checkpoint(tmp_path / "missing.pt", model, args)


def test_predict_writes_masks_of_the_original_size(tmp_path):
    metrics = lora.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--batch-size", "2",
                         "--out", str(tmp_path), "--run-name", "p"])
    assert metrics is not None
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    lora.main(["--model", "tiny", "--device", "cpu", "--resume", str(tmp_path / "p" / "last.pt"),
               "--predict", str(folder), "--predict-out", str(tmp_path / "out")])
    mask = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert mask.shape == (70, 90) and set(np.unique(mask)) <= {0, 1}
    assert (tmp_path / "out" / "a_overlay.jpg").is_file()


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    args, device, model = setup_tiny(tmp_path)
    train_set, _ = load_data(args, device)
    with pytest.raises(common.UserError, match="NaN or infinite by step 1;"):  # short runs log every step
        common.train_loop(model, common.labelled_batches(train_set, 2, args.generator),
                          lambda m, x, y: common.default_loss(m, x, y) * float("nan"), args, device,
                          tmp_path / "nan", 10)


@pytest.mark.parametrize("method", ["lora", "salt"])
def test_exported_weights_load_into_stock_mobile_sam_and_predict_the_same(tmp_path, method):
    """The merged state dict loads into mobile_sam's own registry model (strict) with no code from
    this repository and gives the adapter model's logits."""
    from mobile_sam import sam_model_registry
    import salt
    module = {"lora": lora, "salt": salt}[method]
    args = module.parse_args(["--device", "cpu", "--steps", "1", "--img-size", "1024"])  # stock SAM's input
    device = common.setup(args, method, gpu_steps=1)
    model = common.load_sam(args, device)
    if method == "lora":
        lora.inject(model, 4)
    else:
        salt.inject(model, args)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if p.requires_grad and ("lora_B" in n or "salt_" in n):
            p.data.add_(torch.randn_like(p) * 0.02)  # a non-trivial update to fold
    common.save_checkpoint(tmp_path / "a.pt", model, args)
    module.main(["--device", "cpu", "--resume", str(tmp_path / "a.pt"), "--export-merged", str(tmp_path / "m.pth")])
    stock = sam_model_registry["vit_t"]()
    stock.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=True)
    model.eval(), stock.eval()
    x = torch.rand(1, 3, 1024, 1024)
    with torch.no_grad():
        ours = model(x)
        emb = stock.image_encoder((x * 255 - stock.pixel_mean) / stock.pixel_std)
        sparse, dense = stock.prompt_encoder(None, None, None)
        theirs, _ = stock.mask_decoder.predict_masks(emb, stock.prompt_encoder.get_dense_pe(), sparse, dense)
    assert torch.allclose(ours, theirs[:, :2], atol=1e-3, rtol=1e-3)


def test_methods_that_do_not_fold_refuse_to_export(tmp_path):
    import balr_sam
    args = balr_sam.parse_args(["--model", "tiny", "--device", "cpu"])
    device = common.setup(args, "balr_sam", gpu_steps=1)
    model = common.load_sam(args, device)
    balr_sam.inject(model, args.rank, args.decoder_rank, args.cden_width)
    common.save_checkpoint(tmp_path / "b.pt", model, args)
    with pytest.raises(common.UserError, match="does not fold"):
        balr_sam.main(["--model", "tiny", "--device", "cpu", "--resume", str(tmp_path / "b.pt"),
                       "--export-merged", str(tmp_path / "m.pth")])

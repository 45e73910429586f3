"""Your own scans: 16-bit and float images, volumes, case-wise splits, per-class and per-case (3-D) metrics,
and data that stream from CPU memory. Volumes are generated here: two test cases and one to train on, three
classes, anisotropic voxels."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cli
import common
import data
import lora
import metrics
import unet
from data import UserError, load_data


def brute_hd95(a, b, spacing):
    """medpy.metric.binary.hd95 the slow, obvious way, in any dimension: surfaces by erosion with a cross,
    every pairwise distance in mm, 95th percentile of both directions pooled."""
    def surface(m):
        p = np.pad(m, 1)
        eroded = p[(slice(1, -1),) * m.ndim].copy()
        for axis in range(m.ndim):
            for side in (slice(None, -2), slice(2, None)):
                eroded &= p[tuple(side if i == axis else slice(1, -1) for i in range(m.ndim))]
        return np.argwhere(m & ~eroded) * np.asarray(spacing)
    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def brute_dice(a, b):
    return 1.0 if not a.any() and not b.any() else 2 * (a & b).sum() / (a.sum() + b.sum())


SPACING = (0.8, 1.3, 3.0)  # mm along the canonical (x, y, z) axes


def write_volumes(root, cases=("c1", "c2", "c3"), shape=(24, 20, 8)):
    """CT-like volumes (int16, class c at 100c HU plus noise) and their labels: three classes in boxes that
    move from case to case, empty first and last slices, stored in LPS orientation (the DICOM convention),
    so that reading them turns them to RAS."""
    nib = pytest.importorskip("nibabel", reason="volumes need nibabel (pip install nibabel)")
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # x and y flipped: LPS
    for i, case in enumerate(cases):
        label = np.zeros(shape, np.uint8)
        label[3 + i:10 + i, 4:12, 1:4] = 1
        label[12:20, 2 + i:9 + i, 2:6] = 2
        label[14:22, 12:18, 3:7 - i] = 3
        image = (100.0 * label + rng.normal(0, 5, shape)).astype(np.int16)
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "masks" / f"{case}.nii.gz")
    (root / "test.txt").write_text("c2\nc3\n")
    return nib


def folder_args(root, *extra):
    args = lora.parse_args(["--data", "folder", "--data-root", str(root), "--num-classes", "3", *extra])
    args.img_size, args.batch_size = args.img_size or 32, 4
    args.zoom = args.zoom or 1
    return args


class Threshold(torch.nn.Module):
    """A stand-in for a trained model: class c where the intensity, windowed to [0, 1], is near c / 4."""

    def __init__(self, num_classes, img_size):
        super().__init__()
        self.num_classes, self.img_size = num_classes, img_size
        self.register_buffer("pixel_mean", torch.zeros(1, 3, 1, 1))

    def forward(self, images):  # (B, 3, S, S) -> (B, C+1, S/4, S/4)
        x = F.avg_pool2d(images[:, :1].float(), 4)
        return -(x * 4 - torch.arange(self.num_classes + 1.0).view(1, -1, 1, 1)) ** 2


def test_metric_rules_for_absent_classes():
    target = np.zeros((3, 12, 12), np.uint8)  # as 2-D label maps: (12, 12) each
    target[0, 2:6, 2:6] = 1
    pred = target.copy()
    pred[0, 7:9, 7:9] = 2  # class 2: absent, predicted -> a false alarm
    row = metrics.score(torch.from_numpy(pred[0]), torch.from_numpy(target[0]), 3, name="a", case="a")
    assert row["dice_per_class"] == [1.0, 0.0, 1.0]  # class 3: absent and not predicted: Dice 1
    assert row["hd95_per_class"] == [0.0, None, 0.0]  # the false alarm's HD95 is undefined
    assert row["false_alarm"] == [2] and row["missed"] == []
    assert row["hd95"] == 0.0  # the mean over the classes that have one
    missed = metrics.score(torch.zeros(12, 12, dtype=torch.uint8), torch.from_numpy(target[0]), 1, case="b")
    assert missed["dice"] == 0.0 and missed["hd95"] is None and missed["missed"] == [1]
    summary = metrics.summarise([row, missed])
    assert summary["dice"] == pytest.approx((2 / 3 + 0) / 2)
    assert summary["hd95"] == 0.0  # the case without an HD95 is left out
    assert summary["hd95_undefined"] == dict(missed=1, false_alarm=1)


@pytest.mark.parametrize("seed", range(3))
def test_hd95_3d_with_spacing_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random((9, 11, 7)) < 0.2, rng.random((9, 11, 7)) < 0.1
    assert metrics.hd95(a, b, SPACING) == pytest.approx(brute_hd95(a, b, SPACING), abs=1e-4)
    assert metrics.dice(a, b) == pytest.approx(brute_dice(a, b))


def test_per_case_3d_dice_and_hd95_of_volumes(tmp_path):
    """Volumes are cut into slices, predicted slice by slice, stacked back per case and scored in 3-D in mm."""
    nib = write_volumes(tmp_path)
    args = folder_args(tmp_path, "--window", "0", "400", "--img-size", "64")
    train, test = load_data(args, torch.device("cpu"))
    assert set(train.cases) == {"c1"} and test.cases == ["c2"] * 8 + ["c3"] * 8  # split by case; test: every slice
    assert test.names[:2] == ["c2:000", "c2:001"] and test.volumes["c2"]["spacing"] == pytest.approx(SPACING)
    result, preds = metrics.evaluate(Threshold(3, 64), test, batch_size=4)
    assert [r["case"] for r in result["per_case"]] == ["c2", "c3"] and result["hd95_unit"] == "mm"
    for k, row in enumerate(result["per_case"]):
        gt = np.asarray(nib.as_closest_canonical(nib.load(tmp_path / "masks" / f"{row['case']}.nii.gz")).dataobj)
        pred = torch.stack(preds[8 * k:8 * k + 8], -1).numpy()  # (x, y, z)
        assert pred.shape == gt.shape and 0.5 < (pred == gt).mean() < 1  # a good model, but not a perfect one
        for c in (1, 2, 3):
            assert (pred == c).any()
            assert row["dice_per_class"][c - 1] == pytest.approx(brute_dice(pred == c, gt == c))
            assert row["hd95_per_class"][c - 1] == pytest.approx(brute_hd95(pred == c, gt == c, SPACING), abs=1e-4)
    assert result["dice_per_class"] == pytest.approx([np.mean([r["dice_per_class"][c] for r in result["per_case"]])
                                                      for c in range(3)])


def test_empty_slices_rule(tmp_path):
    write_volumes(tmp_path)
    train_sources, test_sources = data.load_folder(tmp_path, 3, empty_slices=0.0)
    assert train_sources[0].names == [f"c1:{k:03d}" for k in range(1, 7)]  # the slices with foreground
    assert len(test_sources[0].names) == 8  # testing uses every slice
    train_sources, _ = data.load_folder(tmp_path, 3, empty_slices=1.0)
    assert len(train_sources[0].names) == 8


def test_volume_run_writes_3d_scores_and_nifti_masks(tmp_path):
    nib = write_volumes(tmp_path / "vol")
    out = tmp_path / "runs"
    metrics = lora.main(["--model", "tiny", "--device", "cpu", "--data", "folder", "--data-root", str(tmp_path / "vol"),
                         "--num-classes", "3", "--window", "abdomen", "--steps", "2", "--img-size", "32",
                         "--out", str(out), "--run-name", "v"])
    assert [r["case"] for r in metrics["per_case"]] == ["c2", "c3"] and metrics["per_image"] == []
    assert len(metrics["dice_per_class"]) == 3 and metrics["hd95_unit"] == "mm"
    assert metrics["args"]["window"] == [-150.0, 250.0]  # the abdomen preset: level 50, width 400
    saved = nib.load(out / "v" / "test_masks" / "c2.nii.gz")
    assert saved.shape == (24, 20, 8) and np.allclose(saved.header.get_zooms(), SPACING)
    json.loads((out / "v" / "metrics.json").read_text())
    scans = tmp_path / "vol" / "images"
    lora.main(["--resume", str(out / "v" / "adapter.json"), "--device", "cpu", "--predict", str(scans),
               "--predict-out", str(tmp_path / "pred")])
    assert nib.load(tmp_path / "pred" / "c1.nii.gz").shape == (24, 20, 8)


def test_nibabel_is_needed_only_for_volumes(tmp_path, monkeypatch):
    import sys
    import volumes
    monkeypatch.setitem(sys.modules, "nibabel", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install nibabel"):
        volumes.nibabel()


def make_folder(root, stems, image=lambda i: np.full((16, 16), 10 * i, np.uint8)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, stem in enumerate(stems):
        Image.fromarray(image(i)).save(root / "images" / f"{stem}.png")
        Image.fromarray((np.arange(256).reshape(16, 16) % 2).astype(np.uint8)).save(root / "masks" / f"{stem}.png")


def test_2d_files_split_by_case(tmp_path):
    stems = [f"p{p}__s{s}" for p in range(6) for s in range(3)] + ["q9"]
    make_folder(tmp_path, stems)
    for seed in range(4):
        train, test = data.load_folder(tmp_path, 1, seed=seed)
        train_cases, test_cases = {s.case for s in train}, {s.case for s in test}
        assert not train_cases & test_cases and len(train_cases | test_cases) == 7  # p0..p5 and q9
        assert len(test_cases) == 2  # 30% of 7 cases
    (tmp_path / "test.txt").write_text("p1\nq9\n")
    train, test = data.load_folder(tmp_path, 1)
    assert [s.names[0] for s in test] == ["p1__s0", "p1__s1", "p1__s2", "q9"]
    (tmp_path / "test.txt").write_text("p1__s0\n")
    with pytest.raises(UserError, match="belong to case CASE: list 'p1'"):
        data.load_folder(tmp_path, 1)


def test_16_bit_images_are_windowed_not_clipped(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)  # 0 .. 61425
    Image.fromarray(values).save(tmp_path / "x.png")
    image = data.read_image(tmp_path / "x.png")
    assert image.dtype == np.uint16 and np.array_equal(image, values)  # full depth
    low, high = np.percentile(values, data.PERCENTILES)
    assert data.intensity_range(image) == pytest.approx((low, high))
    x = data.image_tensor(image, 64, "cpu", data.intensity_range(image))[0, 0].float()  # same size: no resampling
    expected = torch.from_numpy(np.clip((values / 1 - low) / (high - low), 0, 1)).float()
    assert torch.allclose(x, expected, atol=1e-3)
    assert x.unique().numel() > 3000  # 8-bit clipping left 17 distinct values here (0..255 of 0..61425)
    x = data.image_tensor(image, 64, "cpu", data.parse_window(["1000", "3000"]))[0, 0].float()
    assert torch.allclose(x, torch.from_numpy(np.clip((values / 1 - 1000) / 2000, 0, 1)).float(), atol=1e-3)


def test_float_and_signed_tiffs_are_read_at_full_depth(tmp_path):
    f = np.linspace(-1000.5, 3000.25, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert np.array_equal(data.read_image(tmp_path / "f.tif"), f)
    s = (np.arange(32 * 32).reshape(32, 32) - 500).astype(np.int16)
    Image.fromarray(s).save(tmp_path / "s.tif")
    assert np.array_equal(data.read_image(tmp_path / "s.tif"), s)
    x = data.image_tensor(f, 32, "cpu", data.intensity_range(f))
    assert 0 <= x.min() < 0.01 and 0.99 < x.max() <= 1


def test_16_bit_colour_png_is_refused(tmp_path):
    import struct
    import zlib
    rows = b"".join(b"\0" + np.full((4, 3), 60000, ">u2").tobytes() for _ in range(4))  # a 4x4 RGB, 16 bits
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
                                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with pytest.raises(UserError, match="16-bit colour image"):
        data.read_image(tmp_path / "c.png")


def test_automatic_zoom_stays_within_the_budget():
    def sources(n, shape, channels):
        return [data.Source(str(i), [str(i)], shape, channels, None) for i in range(n)]
    args = lora.parse_args([])
    args.img_size, args.batch_size = 1024, 8
    streamed, _, line = data.plan(sources(14, (584, 565), 3), sources(6, (584, 565), 3), args, torch.device("cpu"))
    assert args.zoom == 2 and not streamed  # DRIVE: on the device, as before
    args.zoom = 0
    streamed, workers, line = data.plan(sources(700, (1072, 1920), 3), sources(300, (1072, 1920), 3), args,
                                        torch.device("cpu"))
    assert args.zoom == 1 and streamed  # zoom 4 would take 111 GiB; zoom 1 still 8.8 GiB: streamed
    assert "zoom 4 would take 111.3 GiB" in line and "streamed" in line


def test_streamed_batches_are_the_rows_of_their_indices(tmp_path):
    make_folder(tmp_path, [f"a{i}" for i in range(10)])
    args = folder_args(tmp_path, "--data-gib", "0", "--workers", "1", "--num-classes", "1")
    train, _ = load_data(args, torch.device("cpu"))
    assert train.streamed and train.workers == 1 and train.pixels.shape[1] == 1  # grey: stored once
    batches = data.streamed_batches(train, 3, torch.device("cpu"), seed=5, start=2)
    g = torch.Generator().manual_seed(5)
    indices = [torch.randint(0, len(train), (3,), generator=g) for _ in range(5)][2:]  # the first 2 skipped
    for idx in indices:
        images, masks = next(batches)
        assert torch.equal(images, train.images[idx]) and torch.equal(masks, train.masks[idx])


def test_a_streamed_run_trains(tmp_path):
    metrics = lora.main(["--model", "tiny", "--device", "cpu", "--steps", "3", "--batch-size", "2", "--data-gib", "0",
                         "--out", str(tmp_path), "--run-name", "s"])
    assert metrics["steps"] == 3 and metrics["args"]["data_gib"] == 0


def test_whole_images_where_a_crop_would_hide_their_context():
    assert data.choose_zoom([(584, 565)], 1024) == 2  # DRIVE: crops of half the side, output at 512
    assert data.choose_zoom([(512, 512)], 1024) == 1  # a chest X-ray: a quarter of it looks like the other lung
    assert data.choose_zoom([(256, 256)], 1024) == 1
    assert data.choose_zoom([(4000, 3000)], 1024) == 4  # at most 4


@pytest.mark.parametrize("num_classes, expected", [(1, "on"), (5, "off")])
def test_flips_are_off_by_default_where_left_and_right_are_classes(num_classes, expected):
    for extra, wanted in (([], expected), (["--flip", "on"], "on")):
        args = lora.parse_args(["--device", "cpu", "--model", "tiny", "--num-classes", str(num_classes), *extra])
        cli.setup(args, "lora", 1000)
        assert args.flip == wanted


@pytest.mark.parametrize("num_classes, expected", [(1, 1e-3), (5, 3e-3)])
def test_learning_rate_is_3e3_by_default_for_several_classes_but_the_unets_stays(num_classes, expected):
    for extra, wanted in (([], expected), (["--lr", "5e-4"], 5e-4)):
        args = lora.parse_args(["--device", "cpu", "--model", "tiny", "--num-classes", str(num_classes), *extra])
        cli.setup(args, "lora", 1000)
        assert args.lr == wanted
    args = unet.parse_args(["--device", "cpu", "--num-classes", str(num_classes)])
    cli.setup(args, "unet", 1000)
    assert args.lr == 1e-3  # the U-Net's best at any number of classes


@pytest.mark.parametrize("num_classes, expected", [(1, 4), (5, 32)])
def test_rank_is_32_by_default_for_several_classes(num_classes, expected):
    import atrous_lora, balr_sam, salt, samora
    for module in (lora, atrous_lora, salt, balr_sam, samora):
        for extra, wanted in (([], expected), (["--rank", "8"], 8)):
            args = module.parse_args(["--device", "cpu", "--model", "tiny", "--num-classes", str(num_classes), *extra])
            cli.setup(args, module.__name__, 1000)
            assert args.rank == wanted, module.__name__
    args = unet.parse_args(["--device", "cpu", "--num-classes", str(num_classes)])
    cli.setup(args, "unet", 1000)
    assert not hasattr(args, "rank")


def test_samora_stage_2_takes_the_rank_of_its_experts(tmp_path, monkeypatch):
    import samora
    experts = tmp_path / "experts.pt"
    common.atomic_save(dict(format="samora-experts-1", model="tiny", rank=2, state={}, stage1={}), experts)
    monkeypatch.setattr(cli, "main", lambda args, *_, **__: args)  # stop before the model is built
    argv = ["--device", "cpu", "--model", "tiny", "--num-classes", "5", "--stage", "2", "--experts", str(experts)]
    assert samora.main(argv).rank == 2
    assert samora.main([*argv, "--rank", "32"]).rank == 32  # given: load_experts then says they differ


@pytest.mark.parametrize("flip", [True, False])
def test_augment_mirrors_only_when_flips_are_on(flip):
    # class 1 on the left half, class 2 on the right: a mirrored sample puts class 1 to the right of class 2
    masks = torch.ones(64, 32, 32, dtype=torch.uint8)
    masks[:, :, 16:] = 2
    images = torch.rand(64, 3, 32, 32)
    _, out = common.augment(images, masks, torch.Generator().manual_seed(0), flip=flip)
    x = torch.arange(32.0)
    left = ((out == 1) * x).sum((1, 2)) / (out == 1).sum((1, 2))
    right = ((out == 2) * x).sum((1, 2)) / (out == 2).sum((1, 2))
    mirrored = (left > right).sum().item()
    assert (mirrored > 16) if flip else (mirrored == 0)


def test_deterministic_turns_on_torch_deterministic_algorithms(one_thread):
    args = lora.parse_args(["--device", "cpu", "--model", "tiny", "--deterministic"])
    try:
        cli.setup(args, "lora", 1000)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_cross_entropy_term_is_torchs():
    logits, masks = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 16, 16))
    full = F.interpolate(logits, (16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(common.segmentation_loss(logits, masks, dice_weight=0), F.cross_entropy(full, masks))


def test_jsrt_loads_as_its_test_list_says_and_trains_with_five_classes(tmp_path, jsrt_root, one_thread):
    """The multi-class X-ray set of the README's second table: 74 train / the 50 cases of test.txt, grey,
    classes 1-5 (lungs, heart, clavicles); a short run reports Dice for each class."""
    argv = ["--data", "folder", "--data-root", str(jsrt_root), "--num-classes", "5", "--model", "tiny",
            "--device", "cpu", "--img-size", "128", "--zoom", "1"]
    args = lora.parse_args(argv)
    train, test = data.load_data(args, torch.device("cpu"))
    assert len(train) == 74 and len(test) == 50
    assert set(test.names) == set((jsrt_root / "test.txt").read_text().split())
    assert train.images.shape[1] == 1 or (train.images[:, 0] == train.images[:, 1]).all()  # grey
    assert set(train.masks.unique().tolist()) == {0, 1, 2, 3, 4, 5}
    metrics = lora.main([*argv, "--steps", "2", "--batch-size", "2", "--out", str(tmp_path)])
    assert len(metrics["dice_per_class"]) == 5 and len(metrics["labelled"]) == 74

"""Datasets for the PEFT-SAM scripts: DRIVE, any image/mask folder, and synthetic retina-like vessels.

Every loader returns a `Split` per part (train/test). A split keeps two views of its images:

* `images`: (N, 3, Z·S, Z·S) float16 in [0, 1], resized once to the working size Z·S (S the model's
  input size, Z the zoom, see `choose_zoom`) and moved to the device once. Small medical datasets fit in
  GPU memory many times over, so training never touches the CPU or the disk again.
* `masks`: (N, Z·S, Z·S) uint8 class ids at the working size (nearest resize), the training targets.
* `orig_masks`, `fovs`: lists of (H, W) tensors at each image's original resolution; evaluation is done
  there, inside the field of view, as the DRIVE protocol asks.

Bad input (missing folder, wrong layout, unreadable file, mask of another size, values that are not
class ids) raises `UserError` with one sentence saying what is wrong and what to do.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class UserError(Exception):
    """A problem with the user's input: main() prints the message alone and exits with status 2."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")

# The SALT paper (arXiv 2503.16055) trains on 14 and tests on 6 of DRIVE's 20 training images. Its
# released split lives in a Hugging Face csv that is not reachable offline, so we fix our own list here:
# the last 6 image ids (35-40) are the test set, the first 14 (21-34) train. The list never changes.
DRIVE_SALT_TRAIN = [f"{i:02d}" for i in range(21, 35)]
DEFAULT_DRIVE_ROOT = "data/DRIVE"  # where --data drive looks without --data-root (as torchvision's root="data")
DRIVE_SALT_TEST = [f"{i:02d}" for i in range(35, 41)]


@dataclass
class Split:
    names: list
    images: torch.Tensor  # (N, 3, Z*S, Z*S) float16 in [0, 1], on the device
    masks: torch.Tensor  # (N, Z*S, Z*S) uint8 class ids, on the device
    orig_masks: list  # N tensors (H, W) uint8 at original resolution, on the device
    fovs: list  # N tensors (H, W) bool, the field of view (all True where the dataset has none)
    input_size: int = 0  # S, the model's input size; images are Z*S wide (set by load_data)

    def __len__(self):
        return len(self.names)

    def subset(self, idx):
        idx = list(idx)
        return Split([self.names[i] for i in idx], self.images[idx], self.masks[idx],
                     [self.orig_masks[i] for i in idx], [self.fovs[i] for i in idx], self.input_size)


def read_image(path):
    """RGB uint8 array (H, W, 3); one clear error for files PIL cannot decode."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError ...)
        raise UserError(f"cannot read image {path} ({e.__class__.__name__}: {e}); replace or remove the file.")


def read_mask(path):
    """(H, W) uint8 array; palette/greyscale GIFs and PNGs are read as stored values, RGB as luminance."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "1", "I;16", "I") else im)
    except Exception as e:
        raise UserError(f"cannot read mask {path} ({e.__class__.__name__}: {e}); replace or remove the file.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def to_class_ids(mask, path, num_classes):
    """Binary masks stored as 0/255 become 0/1; anything else must already hold ids 0..num_classes."""
    values = np.unique(mask)
    if num_classes == 1 and set(values.tolist()) <= {0, 255}:
        return (mask > 0).astype(np.uint8)
    if values.max() > num_classes or values.min() < 0:
        raise UserError(f"mask {path} holds values {values[:8].tolist()} but --num-classes is {num_classes}: "
                        f"masks must hold class ids 0..{num_classes} (or 0/255 for one class); "
                        f"fix the masks or set --num-classes.")
    return mask.astype(np.uint8)


def image_tensor(img, size, device):
    """RGB uint8 array (H, W, 3) -> (1, 3, size, size) float16 in [0, 1] on the device (antialiased
    bilinear resize, done on the device): how every image enters the model, in training and prediction."""
    x = torch.from_numpy(np.array(img)).to(device).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1).half()


def make_split(names, images, masks, fovs, size, device):
    """Resize once to the working size (size x size) on the device; keep originals for evaluation."""
    resized_images, resized_masks = [], []
    for img, m in zip(images, masks):
        resized_images.append(image_tensor(img, size, device))
        t = torch.from_numpy(np.ascontiguousarray(m)).to(device)[None, None].float()
        resized_masks.append(F.interpolate(t, (size, size), mode="nearest").to(torch.uint8))
    return Split(list(names), torch.cat(resized_images), torch.cat(resized_masks)[:, 0],
                 [torch.from_numpy(np.ascontiguousarray(m)).to(device) for m in masks],
                 [torch.from_numpy(np.ascontiguousarray(f)).to(device).bool() for f in fovs])


# ----------------------------------------------------------------------------------------------------
# DRIVE (Staal et al., IEEE TMI 2004): training/{images,1st_manual,mask}, test/{images,1st_manual,mask}
# ----------------------------------------------------------------------------------------------------

def _drive_part(root, part, ids=None):
    folder = Path(root) / part
    for sub in ("images", "1st_manual", "mask"):
        if not (folder / sub).is_dir():
            raise UserError(f"{folder / sub} is missing: a DRIVE folder must hold {part}/images, "
                            f"{part}/1st_manual and {part}/mask as in the official archive.")
    found = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    by_id = {p.name.split("_")[0]: p for p in found}
    ids = ids or sorted(by_id)
    if not ids:
        raise UserError(f"{folder / 'images'} holds no images; put DRIVE's NN_{part}.tif files there.")
    names, images, masks, fovs = [], [], [], []
    for i in ids:
        if i not in by_id:
            raise UserError(f"DRIVE image {i} is missing from {folder / 'images'}; restore it or use --split official.")
        label = folder / "1st_manual" / f"{i}_manual1.gif"
        fov = folder / "mask" / f"{i}_{part}_mask.gif"
        for p in (label, fov):
            if not p.is_file():
                raise UserError(f"{p} is missing: every DRIVE image needs its manual label and its field-of-view mask.")
        img, m, f = read_image(by_id[i]), read_mask(label), read_mask(fov)
        if m.shape != img.shape[:2] or f.shape != img.shape[:2]:
            raise UserError(f"label or field-of-view mask of DRIVE image {i} is {m.shape}/{f.shape} but the image "
                            f"is {img.shape[:2]}: masks must have the size of their image.")
        names.append(i)
        images.append(img)
        masks.append((m > 127).astype(np.uint8))
        fovs.append(f > 127)
    return names, images, masks, fovs


def load_drive(root, split):
    """(names, images, masks, fovs) of the train and the test part, at original resolution."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"DRIVE folder {root} does not exist; download DRIVE and pass its folder "
                        f"(the one holding training/) with --data-root.")
    if split == "salt":
        return _drive_part(root, "training", DRIVE_SALT_TRAIN), _drive_part(root, "training", DRIVE_SALT_TEST)
    elif split == "official":
        if not (root / "test" / "1st_manual").is_dir():
            raise UserError(f"{root / 'test' / '1st_manual'} is missing, so --split official has no labelled test "
                            f"set; use --split salt (14 train / 6 test from the training images).")
        return _drive_part(root, "training"), _drive_part(root, "test")
    raise UserError(f"unknown DRIVE split {split!r}; use --split salt or --split official.")


# ----------------------------------------------------------------------------------------------------
# Any folder: images/<stem>.* and masks/<stem>.* holding class ids; optional split.txt
# ----------------------------------------------------------------------------------------------------

def load_folder(root, num_classes, test_fraction=0.3, seed=0):
    """`root/images` and `root/masks` with matching stems. If `root/test.txt` lists stems (one a line)
    those are the test set; otherwise a seeded `test_fraction` of the stems is held out."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass a folder holding images/ and masks/ with --data-root.")
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise UserError(f"{root / sub} is missing: a folder dataset needs images/ and masks/ with matching file names.")
    imgs = {p.stem: p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    if not imgs:
        raise UserError(f"{root / 'images'} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
    missing = sorted(set(imgs) - set(masks))
    if missing:
        raise UserError(f"{len(missing)} images have no mask of the same name in {root / 'masks'} "
                        f"(first: {missing[0]}); add the masks or remove those images.")
    stems = sorted(imgs)
    if len(stems) < 2:
        raise UserError(f"{root} holds {len(stems)} image; a folder dataset needs at least 2 (train and test).")
    listed = root / "test.txt"
    if listed.is_file():
        test = [s.strip() for s in listed.read_text().splitlines() if s.strip()]
        unknown = [s for s in test if s not in imgs]
        if unknown:
            raise UserError(f"{listed} names {unknown[0]!r}, which is not in {root / 'images'}; fix the list.")
    else:
        order = np.random.default_rng(seed).permutation(len(stems))
        n_test = max(1, round(test_fraction * len(stems)))
        test = [stems[i] for i in sorted(order[:n_test])]
    train = [s for s in stems if s not in set(test)]

    def read(names):
        images, ms, fovs = [], [], []
        for s in names:
            img, m = read_image(imgs[s]), read_mask(masks[s])
            if m.shape != img.shape[:2]:
                raise UserError(f"mask {masks[s]} is {m.shape[1]}x{m.shape[0]} but its image is "
                                f"{img.shape[1]}x{img.shape[0]}; masks must have the size of their image.")
            images.append(img)
            ms.append(to_class_ids(m, masks[s], num_classes))
            fovs.append(np.ones(m.shape, bool))
        return names, images, ms, fovs

    return read(train), read(test)


# ----------------------------------------------------------------------------------------------------
# Synthetic retina: branching vessels on a textured fundus-like background inside a circular field of view
# ----------------------------------------------------------------------------------------------------

def _grow_tree(rng, start, angle, width, depth, segments):
    """Random branching polyline tree: a vessel walks with small turns, thins, and forks."""
    x, y = start
    for _ in range(int(rng.integers(6, 12))):
        angle += rng.normal(0, 0.25)
        step = rng.uniform(0.02, 0.045)
        nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
        segments.append((x, y, nx, ny, width))
        x, y = nx, ny
        if depth < 4 and rng.random() < 0.22:
            side = rng.choice([-1, 1])
            _grow_tree(rng, (x, y), angle + side * rng.uniform(0.4, 1.0), width * rng.uniform(0.55, 0.8),
                       depth + 1, segments)
        width *= 0.96


def synthetic_retina(seed, size=256, num_classes=1):
    """One image (size, size, 3) uint8, its mask (class ids) and field of view, deterministic by seed.

    With num_classes=2 the trees alternate between two classes ("arteries" and "veins": veins darker
    and wider), for tests of the multi-class path."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # pixel centres in [0, 1)
    fov = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.47 ** 2
    # Background: orange-red fundus with low-frequency texture (bilinear-upsampled noise) and vignetting.
    coarse = torch.from_numpy(rng.normal(0, 1, (1, 1, 8, 8)).astype(np.float32))
    texture = F.interpolate(coarse, (size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    vignette = 1 - 0.8 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    disc = np.exp(-(((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.004))  # the optic disc, where vessels start
    base = np.array([0.75, 0.38, 0.16])[:, None, None] * (vignette + 0.05 * texture)[None] + 0.35 * disc[None]
    mask = np.zeros((size, size), np.uint8)
    darkness = np.zeros((size, size), np.float32)
    for t in range(int(rng.integers(4, 7))):
        segments = []
        cls = 1 + (t % 2 if num_classes >= 2 else 0)
        angle = rng.uniform(0, 2 * math.pi)
        _grow_tree(rng, (0.3, 0.5), angle, rng.uniform(0.008, 0.014) * (1.3 if cls == 2 else 1.0), 0, segments)
        for x0, y0, x1, y1, w in segments:  # rasterise each segment as a capsule of half-width w
            # only the segment's bounding box (plus its width) can change, so work on that window
            r0, r1 = max(int((min(y0, y1) - 2 * w) * size), 0), min(int((max(y0, y1) + 2 * w) * size) + 2, size)
            c0, c1 = max(int((min(x0, x1) - 2 * w) * size), 0), min(int((max(x0, x1) + 2 * w) * size) + 2, size)
            if r0 >= r1 or c0 >= c1:
                continue
            wx, wy = xx[r0:r1, c0:c1], yy[r0:r1, c0:c1]
            dx, dy = x1 - x0, y1 - y0
            tt = np.clip(((wx - x0) * dx + (wy - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
            d = np.hypot(wx - (x0 + tt * dx), wy - (y0 + tt * dy))
            mask[r0:r1, c0:c1][(d < w) & fov[r0:r1, c0:c1]] = cls
            dark = darkness[r0:r1, c0:c1]
            np.maximum(dark, np.clip(1 - d / (w * 1.3), 0, 1) * (0.55 if cls == 2 else 0.4), out=dark)
    img = base * (1 - darkness[None] * np.array([0.5, 1.0, 0.9])[:, None, None])
    img = img + rng.normal(0, 0.03, img.shape)
    img = np.clip(img, 0, 1) * fov[None]
    return (img.transpose(1, 2, 0) * 255).astype(np.uint8), mask * fov, fov


def load_synthetic(num_classes=1, n_train=14, n_test=6, size=256, seed=0):
    """Generated in about a second; the same seed always gives the same images."""
    def make(seeds):
        items = [synthetic_retina(s, size, num_classes) for s in seeds]
        return [f"syn{s:04d}" for s in seeds], [i[0] for i in items], [i[1] for i in items], [i[2] for i in items]
    base = 1000 * seed
    return make(range(base, base + n_train)), make(range(base + n_train, base + n_train + n_test))


def load_unlabeled_folder(root, img_size, device):
    """Extra unlabelled images (for self-supervised stages): every image file in `root`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"unlabelled-image folder {root} does not exist; pass an existing folder of images.")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
    return torch.cat([image_tensor(read_image(p), img_size, device) for p in paths])


def choose_zoom(sizes, img_size):
    """SAM predicts masks at a quarter of its input size (256x256 at 1024). A whole 584x565 DRIVE image
    squeezed into one input comes back at 256x256, where a one-pixel vessel is half a pixel wide. With
    zoom Z the model sees crops of 1/Z of the image side (training) and overlapping tiles (evaluation),
    so masks come back at Z*S/4 over the whole image. Auto: the smallest Z whose output has at least
    0.8x the largest side of the data (DRIVE at 1024: Z = 2; 256-pixel synthetic images: Z = 1), at most 4."""
    largest = max(max(h, w) for h, w in sizes)
    return next((z for z in (1, 2, 3, 4) if z * img_size / 4 >= 0.8 * largest), 4)


def check_data_args(args):
    """What --data, --data-root and --num-classes must say before any file is read. common.finish_args calls
    it, so that a method stops on a wrong command before it builds its model (seconds on a CPU, more for a
    large checkpoint); load_data calls it again for callers that come straight to it."""
    if args.data not in ("synthetic", "drive", "folder"):
        raise UserError(f"unknown --data {args.data!r}; use synthetic, drive or folder.")
    if args.data == "drive" and args.data_root is None:
        args.data_root = DEFAULT_DRIVE_ROOT
        if not (Path(args.data_root) / "training").is_dir():
            raise UserError(f"DRIVE is not in {args.data_root}/: put the official DRIVE folder there (so that "
                            f"{args.data_root}/training/images exists), or pass --data-root PATH.")
    if args.data == "folder" and args.data_root is None:
        raise UserError("--data folder needs --data-root DIR (a folder holding images/ and masks/).")
    if args.data == "drive" and args.num_classes != 1:
        raise UserError("DRIVE has one foreground class (vessel); drop --num-classes or set it to 1.")


def load_data(args, device):
    """Dispatch on --data; returns (train Split, test Split) at the working size zoom * img_size.
    Sets args.zoom when it is 0 (auto)."""
    check_data_args(args)
    if args.data == "synthetic":
        train, test = load_synthetic(args.num_classes, args.synthetic_train, args.synthetic_test, seed=args.data_seed)
    elif args.data == "drive":
        train, test = load_drive(args.data_root, args.split)
    else:
        train, test = load_folder(args.data_root, args.num_classes, seed=args.data_seed)
    if not args.zoom:
        args.zoom = choose_zoom([m.shape for m in train[2] + test[2]], args.img_size)
        if args.zoom > 1:
            print(f"zoom {args.zoom}: training on crops of 1/{args.zoom} of the image side, evaluating on "
                  f"overlapping tiles (--zoom 1 to feed whole images)")
    splits = make_split(*train, args.zoom * args.img_size, device), make_split(*test, args.zoom * args.img_size, device)
    for split in splits:
        split.input_size = args.img_size
    return splits

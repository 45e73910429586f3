"""Datasets for the PEFT-SAM scripts: DRIVE, any folder of 2-D images or 3-D volumes with masks, and
synthetic retina-like vessels.

Every loader returns a `Split` per part (train/test). A split keeps two views of its images:

* `images`: (N, 3, Z·S, Z·S) float16 in [0, 1], resized once to the working size Z·S (S the model's
  input size, Z the zoom, see `choose_zoom`). Grey images are stored once and seen as three equal channels.
* `masks`: (N, Z·S, Z·S) uint8 class ids at the working size (nearest resize), the training targets.
* `orig_masks`, `fovs`: each image's mask at its original resolution and its field of view (None: the whole
  image); evaluation is done there, as the DRIVE protocol asks.

Where a split is held: data that fit --data-gib (4 GiB by default) are moved to the GPU once, so training
never touches the CPU or the disk again (DRIVE takes 0.6 GiB); larger data stay in CPU memory and stream to
the GPU a batch at a time through a DataLoader (`streamed_batches`). The automatic zoom never takes the data
past the budget (`plan`), and `load_data` says in one line what it chose and why.

Intensities (`intensity_range`): 8-bit images are divided by 255. 16-bit, signed and float images (PNG,
TIFF) are read at full depth and mapped linearly to [0, 1] from the 0.5th-99.5th percentile of each image
(of each volume, for volumes), or from `--window LOW HIGH` in the file's units (a CT preset name gives its
window in Hounsfield units, CT_WINDOWS), then clipped to [0, 1].

Cases: data are split by case, never by image. A 2-D file is its own case unless its stem is CASE__REST
(two underscores: p07__s012.png and p07__s013.png are case p07); a volume (volumes.py: .nii / .nii.gz)
is one case. `test.txt` lists test cases; without it a seeded 30% of the cases is held out.

Bad input (missing folder, wrong layout, unreadable file, mask of another size, values that are not
class ids) raises `UserError` with one sentence saying what is wrong and what to do.
"""
import itertools
import math
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class UserError(Exception):
    """A problem with the user's input: main() prints the message alone and exits with status 2."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
VOLUME_SUFFIXES = (".nii.gz", ".nii")

# The SALT paper (arXiv 2503.16055) trains on 14 and tests on 6 of DRIVE's 20 training images. Its
# released split lives in a Hugging Face csv that is not reachable offline, so we fix our own list here:
# the last 6 image ids (35-40) are the test set, the first 14 (21-34) train. The list never changes.
DRIVE_SALT_TRAIN = [f"{i:02d}" for i in range(21, 35)]
DEFAULT_DRIVE_ROOT = "data/DRIVE"  # where --data drive looks without --data-root (as torchvision's root="data")
DRIVE_SALT_TEST = [f"{i:02d}" for i in range(35, 41)]


@dataclass
class Split:
    names: list  # one per image; a volume's slices are CASE:SSS
    pixels: torch.Tensor  # (N, C, Z*S, Z*S) float16 in [0, 1], C = 1 (all grey) or 3; on the device or in CPU memory
    masks: torch.Tensor  # (N, Z*S, Z*S) uint8 class ids, where `pixels` are
    orig_masks: list  # N tensors (H, W) uint8 at original resolution, where `pixels` are
    fovs: list  # N tensors (H, W) bool, the field of view, or None (the whole image)
    input_size: int = 0  # S, the model's input size; images are Z*S wide (set by load_data)
    cases: list = None  # the case of each image
    volumes: dict = None  # case -> dict(spacing=(mm along H, W, slice), affine=4x4) where the cases are volumes
    streamed: bool = False  # held in CPU memory and streamed to the device (over --data-gib)
    workers: int = 0  # DataLoader worker processes of a streamed split

    @property
    def images(self):
        """(N, 3, Z*S, Z*S): grey images seen as three equal channels (a view, no copy)."""
        return self.pixels.expand(-1, 3, -1, -1)

    def __len__(self):
        return len(self.names)

    def subset(self, idx):
        idx = list(idx)
        return replace(self, names=[self.names[i] for i in idx], pixels=self.pixels[idx], masks=self.masks[idx],
                       orig_masks=[self.orig_masks[i] for i in idx], fovs=[self.fovs[i] for i in idx],
                       cases=[self.cases[i] for i in idx])


# ----------------------------------------------------------------------------------------------------
# Reading images at full depth, and their intensities
# ----------------------------------------------------------------------------------------------------

GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")
# CT windows as (level, width) in Hounsfield units: the usual radiology presets (Radiopaedia, "Windowing (CT)")
CT_WINDOWS = {"abdomen": (50, 400), "lung": (-600, 1500), "bone": (400, 1800), "brain": (40, 80)}
PERCENTILES = (0.5, 99.5)  # the automatic window of 16-bit, signed and float images: robust to a few hot pixels


def _check_depth(im, path):
    """Pillow reads 16-bit colour PNGs and TIFFs as 8 bits per channel, and only the first page of a
    multi-page file: refuse those rather than train on less than the file holds."""
    bits = 0
    if im.format == "PNG":
        with open(path, "rb") as f:
            bits = f.read(25)[24]  # the IHDR chunk's bit depth
    elif im.format == "TIFF":
        bits = max(im.tag_v2.get(258, (8,)))  # BitsPerSample
    if bits > 8 and im.mode not in GREY_MODES:
        raise UserError(f"{path} is a {bits}-bit colour image, which Pillow would read as 8-bit; save it as 16-bit "
                        f"greyscale, or as 8-bit colour if that is all it holds.")
    if getattr(im, "n_frames", 1) > 1:
        raise UserError(f"{path} holds {im.n_frames} pages or frames; save each as its own file (volumes: .nii.gz).")


@contextmanager
def _open_image(path):
    """The image file, opened by PIL and checked (`_check_depth`); one clear error for a file PIL cannot
    decode, raised where it fails (opening, or reading in the `with` body)."""
    try:
        with Image.open(path) as im:
            _check_depth(im, path)
            yield im
    except UserError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError ...)
        raise UserError(f"cannot read image {path} ({e.__class__.__name__}: {e}); replace or remove the file.")


def image_header(path):
    """((H, W), channels: 1 grey or 3 colour) of an image file, read from its header only."""
    with _open_image(path) as im:
        return (im.height, im.width), 1 if im.mode in GREY_MODES else 3


def read_image(path):
    """An image at full depth: (H, W) grey or (H, W, 3) RGB, as uint8, uint16, int32 or float32 as stored.
    One clear error for files PIL cannot decode, or can decode only in part (`_check_depth`)."""
    with _open_image(path) as im:
        if im.mode in ("I", "F") or im.mode.startswith("I;16"):
            arr = np.asarray(im)
            arr = arr.astype(arr.dtype.newbyteorder("="))  # I;16B is big-endian
        else:
            arr = np.asarray(im.convert("L" if im.mode in GREY_MODES else "RGB"))
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise UserError(f"image {path} holds NaN or infinite values; replace them (e.g. by the background value).")
    return arr


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


def parse_window(values):
    """--window as given (None, [PRESET] or [LOW, HIGH]) -> None or [low, high] in the image's units."""
    if values is None:
        return None
    if len(values) == 1 and values[0] in CT_WINDOWS:
        level, width = CT_WINDOWS[values[0]]
        return [level - width / 2, level + width / 2]
    try:
        low, high = (float(v) for v in values)
    except ValueError:  # not two numbers
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UserError(f"--window {' '.join(map(str, values))} is neither LOW HIGH (two numbers, LOW < HIGH) nor "
                        f"a CT preset; e.g. --window -160 240, or one of {', '.join(CT_WINDOWS)}.")
    return [low, high]


def intensity_range(image, window=None):
    """The raw values that become 0 and 1: `window` (low, high) where given; else None for 8-bit images
    (divided by 255, as they always were) and the 0.5th and 99.5th percentiles of the image's values for
    16-bit, signed and float ones (for a volume: of the whole volume, so its slices share one mapping)."""
    if window is not None:
        return tuple(window)
    if image.dtype == np.uint8:
        return None
    low, high = (float(v) for v in np.percentile(image, PERCENTILES))
    return (low, high) if high > low else (low, low + 1)  # a constant image becomes 0


def image_tensor(img, size, device, value_range=None):
    """An image at full depth ((H, W) grey or (H, W, 3) colour) -> (1, C, size, size) float16 in [0, 1] on
    the device, C = 1 or 3: intensities mapped by `value_range` (see intensity_range; None for 8-bit: / 255),
    then an antialiased bilinear resize on the device. How every image enters the model, in training and
    prediction."""
    img = np.asarray(img)
    if value_range is None and img.dtype != np.uint8:
        value_range = intensity_range(img)
    if value_range is None:
        x = torch.from_numpy(np.array(img)).to(device)
        x = (x[..., None] if x.ndim == 2 else x).permute(2, 0, 1)[None].float() / 255
    else:
        low, high = value_range
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).to(device)
        x = ((x[..., None] if x.ndim == 2 else x).permute(2, 0, 1)[None] - low) / (high - low)
    return F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1).half()


# ----------------------------------------------------------------------------------------------------
# Sources: what a split is made of, known before anything is decoded
# ----------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """A file (or decoded array) that gives one image, or a volume that gives several slices: what planning
    needs before anything is decoded (how many images, their size, grey or colour) and how to decode them."""
    case: str
    names: list  # the images it gives, in order
    shape: tuple  # (H, W) of each, at original resolution
    channels: int  # 1 (grey) or 3 (colour)
    read: object  # () -> one (image at full depth, value range or None, mask (H, W) uint8, fov or None) per name
    spacing: tuple = None  # a volume's voxel size in mm along (H, W, slice): its test scores are 3-D
    affine: object = None  # a volume's 4x4 voxel-to-world matrix, for writing predicted masks


def array_sources(names, images, masks, fovs, window=None):
    """Sources of images already decoded (DRIVE, synthetic): each image its own case."""
    return [Source(n, [n], m.shape, 3 if img.ndim == 3 else 1,
                   lambda img=img, m=m, f=f: [(img, intensity_range(img, window), m, f)])
            for n, img, m, f in zip(names, images, masks, fovs)]


def _read_ahead(sources, threads=4):
    """source.read() of every source, in order, decoded by a few threads ahead of use (Pillow, zlib and
    nibabel decode without holding Python's lock)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(pool.submit(s.read) for s in sources[:2 * threads])
        for k in range(len(sources)):
            if k + 2 * threads < len(sources):
                pending.append(pool.submit(sources[k + 2 * threads].read))
            yield pending.popleft().result()


def make_split(sources, size, device, store):
    """Decode every source, map and resize its images once to size x size on `device`, and hold the
    results in `store` (the device, or CPU memory for a streamed split), with the masks at original size."""
    n = sum(len(s.names) for s in sources)
    pixels = torch.empty(n, max(s.channels for s in sources), size, size, dtype=torch.float16, device=store)
    masks = torch.empty(n, size, size, dtype=torch.uint8, device=store)
    orig_masks, fovs, i = [], [], 0
    for decoded in _read_ahead(sources):
        for img, value_range, m, fov in decoded:
            pixels[i] = image_tensor(img, size, device, value_range)[0]  # a grey image fills every channel
            t = torch.from_numpy(np.ascontiguousarray(m)).to(device)[None, None].float()
            masks[i] = F.interpolate(t, (size, size), mode="nearest")[0, 0].to(torch.uint8)
            orig_masks.append(torch.from_numpy(np.ascontiguousarray(m)).to(store))
            fovs.append(None if fov is None else torch.from_numpy(np.ascontiguousarray(fov)).to(store).bool())
            i += 1
    volumes = {s.case: dict(spacing=s.spacing, affine=s.affine) for s in sources if s.spacing is not None}
    return Split([name for s in sources for name in s.names], pixels, masks, orig_masks, fovs,
                 cases=[s.case for s in sources for _ in s.names], volumes=volumes or None)


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
# Any folder: images/<name>.* and masks/<name>.* holding class ids (2-D images, or volumes: volumes.py);
# optional test.txt listing test cases
# ----------------------------------------------------------------------------------------------------

CASE_SEPARATOR = "__"


def file_name(path):
    """A file's name without its suffix (a.nii.gz -> a)."""
    name = Path(path).name
    return name[:-len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def by_name(folder, suffixes):
    """{name without suffix: path} of the files in `folder` that end in one of `suffixes`; two of one name
    (a.png and a.jpg) are an error, never picked without a word."""
    found = {}
    for p in sorted(folder.iterdir()):
        if p.name.lower().endswith(suffixes):
            if file_name(p) in found:
                raise UserError(f"{found[file_name(p)]} and {p} have the same name; remove one of them (which one "
                                f"to use is not clear).")
            found[file_name(p)] = p
    return found


def case_of(stem):
    """The case of a 2-D file: the part of its stem before the first '__' (p07__s012 -> p07), else the stem."""
    return stem.split(CASE_SEPARATOR)[0] or stem


def split_cases(cases, root, test_fraction, seed):
    """The test cases: those `root/test.txt` lists (one a line), or a seeded `test_fraction` of the cases."""
    listed = root / "test.txt"
    if listed.is_file():
        test = [s.strip() for s in listed.read_text().splitlines() if s.strip()]
        unknown = [s for s in test if s not in cases]
        if unknown:
            hint = (f" (files named CASE{CASE_SEPARATOR}REST belong to case CASE: list {case_of(unknown[0])!r})"
                    if case_of(unknown[0]) in cases else "")
            raise UserError(f"{listed} names {unknown[0]!r}, which is not a case in {root / 'images'}{hint}; fix the list.")
        if not test or set(test) >= set(cases):
            raise UserError(f"{listed} lists {'no' if not test else 'every'} case, which leaves "
                            f"{'nothing to test on' if not test else 'nothing to train on'}; list the test cases only.")
        return set(test)
    order = np.random.default_rng(seed).permutation(len(cases))
    n_test = max(1, round(test_fraction * len(cases)))
    return {cases[i] for i in order[:n_test]}


def image_source(image_path, mask_path, num_classes, window):
    """The source of one 2-D image and its mask."""
    def read():
        img, m = read_image(image_path), read_mask(mask_path)
        if m.shape != img.shape[:2]:
            raise UserError(f"mask {mask_path} is {m.shape[1]}x{m.shape[0]} but its image is "
                            f"{img.shape[1]}x{img.shape[0]}; masks must have the size of their image.")
        return [(img, intensity_range(img, window), to_class_ids(m, mask_path, num_classes), None)]
    shape, channels = image_header(image_path)
    stem = file_name(image_path)
    return Source(case_of(stem), [stem], shape, channels, read)


def load_folder(root, num_classes, test_fraction=0.3, seed=0, window=None, empty_slices=0.25):
    """`root/images` and `root/masks` with matching names: 2-D images, or NIfTI volumes (one a case, see
    volumes.py). If `root/test.txt` lists cases (one a line) those are the test set; otherwise a seeded
    `test_fraction` of the cases is held out. Returns the train and test sources."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass a folder holding images/ and masks/ with --data-root.")
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise UserError(f"{root / sub} is missing: a folder dataset needs images/ and masks/ with matching file names.")
    suffixes = IMAGE_SUFFIXES + VOLUME_SUFFIXES
    imgs, masks = by_name(root / "images", suffixes), by_name(root / "masks", suffixes)
    if not imgs:
        raise UserError(f"{root / 'images'} holds no images (looked for {', '.join(suffixes)}).")
    missing = sorted(set(imgs) - set(masks))
    if missing:
        raise UserError(f"{len(missing)} images have no mask of the same name in {root / 'masks'} "
                        f"(first: {missing[0]}); add the masks or remove those images.")
    is_volume = {s: imgs[s].name.lower().endswith(VOLUME_SUFFIXES) for s in imgs}
    if len(set(is_volume.values())) > 1:
        raise UserError(f"{root / 'images'} holds both volumes (.nii, .nii.gz) and 2-D images; keep one kind per folder.")
    volumes = next(iter(is_volume.values()))
    stems = sorted(imgs)
    cases = stems if volumes else sorted({case_of(s) for s in stems})
    if len(cases) < 2:
        raise UserError(f"{root} holds {len(cases)} case; a folder dataset needs at least 2 (train and test).")
    test = split_cases(cases, root, test_fraction, seed)
    if volumes:
        from volumes import volume_source
        rng = np.random.default_rng(seed)  # which empty slices train
        return ([volume_source(imgs[s], masks[s], num_classes, window, empty_slices, rng) for s in stems if s not in test],
                [volume_source(imgs[s], masks[s], num_classes, window, 1.0, rng) for s in stems if s in test])
    return ([image_source(imgs[s], masks[s], num_classes, window) for s in stems if case_of(s) not in test],
            [image_source(imgs[s], masks[s], num_classes, window) for s in stems if case_of(s) in test])


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


def load_unlabeled_folder(root, img_size, device, window=None):
    """Extra unlabelled images (for self-supervised stages): every image file in `root`, (N, 3, S, S)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"unlabelled-image folder {root} does not exist; pass an existing folder of images.")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}).")
    images = (read_image(p) for p in paths)
    return torch.cat([image_tensor(img, img_size, device, intensity_range(img, window)).expand(-1, 3, -1, -1)
                      for img in images])


def choose_zoom(sizes, img_size):
    """SAM predicts masks at a quarter of its input size (256x256 at 1024). A whole 584x565 DRIVE image
    squeezed into one input comes back at 256x256, where a one-pixel vessel is half a pixel wide. With
    zoom Z the model sees crops of 1/Z of the image side (training) and overlapping tiles (evaluation),
    so masks come back at Z*S/4 over the whole image. But a crop also hides what lies outside it: in a
    quarter of a chest X-ray the left lung looks like the right one. Auto: the smallest Z whose output has
    at least half the largest side of the data, at most 4 (DRIVE's 584 px at 1024: Z = 2; 512-px X-ray
    and CT slices and 256-px synthetic images: Z = 1, whole images). plan lowers it where the data would
    take more than --data-gib."""
    largest = max(max(h, w) for h, w in sizes)
    return next((z for z in (1, 2, 3, 4) if z * img_size / 4 >= 0.5 * largest), 4)


# ----------------------------------------------------------------------------------------------------
# Where the data are held: on the device within --data-gib, else in CPU memory, streamed
# ----------------------------------------------------------------------------------------------------

# The default budget: a sixth of a 24 GB card, whose rest trains ViT-B at batch 8 (9.1 GiB, README's Speed).
DATA_GIB = 4.0


def data_bytes(sources, side):
    """Bytes the decoded data take at working size `side`: images as float16 (2 bytes a value, 1 or 3
    channels) and masks (1 byte a pixel) at that size, plus the masks at original size."""
    channels = max(s.channels for s in sources)
    n = sum(len(s.names) for s in sources)
    return n * (2 * channels + 1) * side * side + sum(len(s.names) * s.shape[0] * s.shape[1] for s in sources)


def loader_workers(wanted, batch_bytes):
    """DataLoader workers hand their batches over through shared memory (/dev/shm), which containers often
    keep small (Docker: 64 MB): as many workers as half of its free space holds, with the 2 batches each
    keeps in flight, and no more than the CPU's cores; 0 (the main process gathers) where it holds none."""
    try:
        shm = os.statvfs("/dev/shm")
        fits = shm.f_bavail * shm.f_frsize // 2 // (2 * batch_bytes)
    except OSError:  # no /dev/shm (macOS, Windows): the platform's own shared memory
        fits = wanted
    return max(0, min(wanted, os.cpu_count() or 1, fits))


def plan(train, test, args, device):
    """The zoom (args.zoom, or automatic) and where the data are held; sets args.zoom and returns
    (streamed, workers, the one line that says so)."""
    sources = train + test
    S, budget = args.img_size, args.data_gib * 2 ** 30
    largest = max(max(s.shape) for s in sources)
    given = bool(args.zoom)
    zoom = wanted = args.zoom or choose_zoom([s.shape for s in sources], S)
    while not given and zoom > 1 and data_bytes(sources, zoom * S) > budget:
        zoom -= 1  # the automatic zoom never takes the data past the budget
    args.zoom, nbytes = zoom, data_bytes(sources, zoom * S)
    streamed = nbytes > budget
    channels = max(s.channels for s in sources)
    workers = loader_workers(args.workers, args.batch_size * (2 * channels + 1) * (zoom * S) ** 2) if streamed else 0
    why = ("as set" if given else f"zoom {wanted} would take {data_bytes(sources, wanted * S) / 2**30:.1f} GiB"
           if zoom < wanted else f"masks at {zoom * S // 4} px for a largest side of {largest} px")
    where = (f"in CPU memory, streamed to the {device.type} by {workers} DataLoader workers" if streamed else
             f"held on the {device.type}")
    count = lambda part: sum(len(s.names) for s in part)  # noqa: E731
    line = (f"data: {count(train)} train + {count(test)} test images ({'grey' if channels == 1 else 'colour'}), "
            f"zoom {zoom} ({why}), {zoom * S} px working size: {nbytes / 2**30:.2f} GiB, {where} "
            f"({'over' if streamed else 'within'} --data-gib {args.data_gib:g})")
    if zoom > 1:
        line += f"; training on crops of 1/{zoom} of the side, evaluating on overlapping tiles (--zoom 1: whole images)"
    return streamed, workers, line


class _Rows(torch.utils.data.Dataset):
    """Image i (C, W, W) and mask i (W, W) of a split held in CPU memory: what a DataLoader worker gathers."""

    def __init__(self, split):
        self.pixels, self.masks = split.pixels, split.masks

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return self.pixels[i], self.masks[i]


class _RandomBatches(torch.utils.data.Sampler):
    """Batches of indices drawn with replacement from a generator seeded with `seed`, forever, after the
    first `start` (a resumed run continues the sequence where it stopped)."""

    def __init__(self, n, batch_size, seed, start):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for k in itertools.count():
            idx = torch.randint(0, self.n, (self.batch_size,), generator=g)
            if k >= self.start:
                yield idx.tolist()


def _ignore_interrupts(worker_id):
    # Ctrl-C reaches every process of the terminal's group; the main process takes it at a step boundary
    # (common.Interrupts) and needs its workers alive until then
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def streamed_batches(split, batch_size, device, seed, start=0):
    """Random batches of a split held in CPU memory, as (images (B, 3, W, W) float16, masks (B, W, W) uint8)
    on `device`: indices drawn on the CPU from a generator seeded with `seed` (the path on the device draws
    them there, so the two sequences differ), gathered by `split.workers` processes into pinned memory, and
    copied to the device without waiting (non_blocking): the CPU queues the step while the copy runs."""
    workers = split.workers
    loader = torch.utils.data.DataLoader(
        _Rows(split), batch_sampler=_RandomBatches(len(split), batch_size, seed, start), num_workers=workers,
        pin_memory=device.type == "cuda", worker_init_fn=_ignore_interrupts, prefetch_factor=2 if workers else None,
        # fork: the workers share the split's memory instead of receiving a copy of it
        multiprocessing_context="fork" if workers and "fork" in torch.multiprocessing.get_all_start_methods() else None)
    for pixels, masks in loader:
        yield pixels.to(device, non_blocking=True).expand(-1, 3, -1, -1), masks.to(device, non_blocking=True)


def check_data_args(args):
    """What --data, --data-root, --num-classes and the other data arguments must say before any file is read.
    cli.finish_args calls it, so that a method stops on a wrong command before it builds its model (seconds
    on a CPU, more for a large checkpoint); load_data calls it again for callers that come straight to it."""
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
    args.window = parse_window(args.window)
    if not 0 <= args.empty_slices <= 1:
        raise UserError(f"--empty-slices {args.empty_slices} must be a fraction in [0, 1], e.g. 0.25.")
    if not (math.isfinite(args.data_gib) and args.data_gib >= 0):
        raise UserError(f"--data-gib {args.data_gib} must be a number of at least 0 (0: always stream), e.g. 4.")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers} must be at least 0 (0: the main process gathers the batches).")


def load_data(args, device):
    """Dispatch on --data; returns (train Split, test Split) at the working size zoom * img_size, held on the
    device or streamed from CPU memory as `plan` decides (one printed line says which). Sets args.zoom when
    it is 0 (auto)."""
    check_data_args(args)
    if args.data == "synthetic":
        train, test = load_synthetic(args.num_classes, args.synthetic_train, args.synthetic_test, seed=args.data_seed)
    elif args.data == "drive":
        train, test = load_drive(args.data_root, args.split)
    if args.data in ("synthetic", "drive"):
        train, test = array_sources(*train, window=args.window), array_sources(*test, window=args.window)
    else:
        train, test = load_folder(args.data_root, args.num_classes, seed=args.data_seed, window=args.window,
                                  empty_slices=args.empty_slices)
    streamed, workers, line = plan(train, test, args, device)
    print(line)
    store = torch.device("cpu") if streamed else device
    splits = [make_split(part, args.zoom * args.img_size, device, store) for part in (train, test)]
    for split in splits:
        split.input_size, split.streamed, split.workers = args.img_size, streamed, workers
    return splits

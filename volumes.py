"""NIfTI volumes (.nii, .nii.gz): training slice by slice, scoring case by case in 3-D.

A folder of volumes is a folder dataset (data.load_folder) whose files are volumes: images/CASE.nii.gz and
masks/CASE.nii.gz (class ids 0..C), one case a file; test.txt lists test cases. nibabel reads them, and only
them: it is an optional dependency (pip install nibabel).

* Orientation: each volume is turned to the closest RAS+ orientation (nibabel's as_closest_canonical), so
  the last axis runs from inferior to superior and the slices, cut along it, are axial for the usual CT and
  MR scans. Image and label volumes must have the same shape.
* Intensities (data.intensity_range): --window LOW HIGH in the file's units, a CT preset (--window abdomen,
  lung, bone, brain: Hounsfield windows in data.CT_WINDOWS), or by default the 0.5th-99.5th percentile of
  the whole volume (MR has no fixed unit), mapped to [0, 1].
* Slices without foreground: training keeps every slice with a labelled voxel and a seeded fraction
  (--empty-slices, 0.25) of the others, so that the model also learns to find nothing; testing uses every
  slice. Each slice keeps its case (Split.cases) and is named CASE:SSS.
* Scores: the test slices of a case are stacked back into its volume and scored in 3-D (metrics.score),
  with the voxel spacing of the header (mm); predicted masks are written as CASE.nii.gz.
"""
import numpy as np

from data import Source, UserError, file_name, intensity_range


def nibabel():
    try:
        import nibabel
    except ModuleNotFoundError:
        raise UserError("reading .nii/.nii.gz volumes needs nibabel, which is not installed; run pip install nibabel.")
    return nibabel


def read_volume(path, what="volume"):
    """A NIfTI image turned to the closest RAS+ orientation; its data are read when asked for."""
    nib = nibabel()
    try:
        volume = nib.as_closest_canonical(nib.load(str(path)))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError (truncated gzip) ...
        raise UserError(f"cannot read {what} {path} ({e.__class__.__name__}: {e}); replace or remove the file.")
    if len(volume.shape) != 3:
        raise UserError(f"{what} {path} has shape {volume.shape}; give one 3-D volume (X, Y, Z) per case and file.")
    return volume


def volume_data(volume, path, what="volume"):
    """The voxel values (X, Y, Z) as float32, in the file's units (CT: Hounsfield, after the header's scaling)."""
    try:
        data = volume.get_fdata(dtype=np.float32)
    except Exception as e:
        raise UserError(f"cannot read {what} {path} ({e.__class__.__name__}: {e}); replace or remove the file.")
    if not np.isfinite(data).all():
        raise UserError(f"{what} {path} holds NaN or infinite values; replace them (e.g. by the background value).")
    return data


def read_labels(path, num_classes):
    """A label volume as uint8 class ids (X, Y, Z), in the closest RAS+ orientation, and its NIfTI image."""
    volume = read_volume(path, "label volume")
    labels = volume_data(volume, path, "label volume")
    ids = np.rint(labels)
    if np.abs(labels - ids).max() > 1e-3 or ids.min() < 0 or ids.max() > num_classes:
        values = np.unique(labels)[:8].tolist()
        raise UserError(f"label volume {path} holds values {values} but --num-classes is {num_classes}: label "
                        f"volumes must hold class ids 0..{num_classes}; fix them or set --num-classes.")
    return ids.astype(np.uint8), volume


def volume_source(image_path, label_path, num_classes, window, empty_fraction, rng):
    """The source of one case: its slices along the last axis, every slice with a labelled voxel and a
    fraction `empty_fraction` of the others (drawn with `rng`; 1.0 keeps them all). The label volume is read
    now, to choose the slices; the image volume when the split is made."""
    labels, label_volume = read_labels(label_path, num_classes)
    image = read_volume(image_path, "image volume")
    if image.shape != labels.shape:
        raise UserError(f"label volume {label_path} has shape {labels.shape} but its image {image.shape}; a label "
                        f"volume must have the shape of its image.")
    has_label = labels.reshape(-1, labels.shape[2]).any(0)  # (Z,): does slice k hold foreground
    keep = has_label | (rng.random(len(has_label)) < empty_fraction)
    slices = np.flatnonzero(keep).tolist()
    case = file_name(image_path)

    def read():
        data = volume_data(image, image_path, "image volume")
        value_range = intensity_range(data, window)  # one mapping for the whole volume
        return [(np.ascontiguousarray(data[:, :, k]), value_range, labels[:, :, k], None) for k in slices]

    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return Source(case, [f"{case}:{k:03d}" for k in slices], labels.shape[:2], 1, read, spacing, image.affine)


def save_masks(folder, split, preds):
    """One CASE.nii.gz of class ids per test case: its slice masks (H, W) stacked along the last axis, with
    the affine of its (reoriented) image, so that viewers overlay it on the scan."""
    nib = nibabel()
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}
    for case, pred in zip(split.cases, preds):
        cases.setdefault(case, []).append(pred.cpu().numpy())
    for case, slices in cases.items():
        mask = nib.Nifti1Image(np.stack(slices, -1).astype(np.uint8), split.volumes[case]["affine"])
        nib.save(mask, folder / f"{case}.nii.gz")


def predict_file(model, path, out, batch_size):
    """--predict for a volume: every slice predicted as in testing (the volume's intensity mapping, the
    model's zoom), the masks stacked into one volume of class ids with the reoriented volume's affine."""
    from cli import predict_masks
    nib = nibabel()
    volume = read_volume(path)
    data = volume_data(volume, path)
    slices = [data[:, :, k] for k in range(data.shape[2])]  # (H, W) each
    masks = predict_masks(model, slices, batch_size, value_range=intensity_range(data, model.window))
    nib.save(nib.Nifti1Image(np.stack(masks, -1), volume.affine), out)

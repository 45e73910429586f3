"""How a model is scored: Dice and HD95 written out by hand, per class and per case (2-D images in pixels,
volumes in mm), and `evaluate`, which predicts a test split tile by tile (`predict`) and scores it. cli.run
evaluates before, during and after training; the training loop (common.train_loop) receives the evaluation
as a function and knows nothing of the metrics.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from common import Progress, autocast


# ----------------------------------------------------------------------------------------------------
# Metrics: Dice and HD95 written out by hand (definitions of medpy.metric.binary.dc / hd95), per class and
# per case. Where medpy gives no number (its hd95 raises when either mask is empty; its dc divides 0 by 0
# when both are) the rules are these, for each foreground class:
#   ground truth  prediction  Dice   HD95
#   present       present     medpy  medpy: pixels for 2-D images, mm (the voxel spacing) for volumes
#   present       empty       0      undefined: None in metrics.json, left out of HD95 means, counted as missed
#   empty         present     0      undefined: None, left out of HD95 means, counted as a false alarm
#   empty         empty       1      0 (nothing to find, nothing found)
# A number in place of the undefined HD95 (the image diagonal; or 0, as SAMed's test code, which also
# scores a false alarm Dice 1) would decide the HD95 mean of a class that is often absent; here the Dice
# carries the error and the counts report it.
# ----------------------------------------------------------------------------------------------------

def _as_bool(mask):
    return (torch.from_numpy(np.asarray(mask)) if not torch.is_tensor(mask) else mask).bool()


def dice(pred, target):
    """2|A∩B| / (|A| + |B|) on boolean masks (2-D or 3-D). Both empty: 1.0 (nothing to find, nothing found)."""
    pred, target = _as_bool(pred), _as_bool(target)
    inter = (pred & target).sum()
    total = pred.sum() + target.sum()
    return float(1.0 if total == 0 else 2 * inter / total)


def _surface(mask):
    """Elements of a 2-D or 3-D mask with a face neighbour outside it: the mask minus its erosion by a cross
    (4 neighbours in 2-D, 6 in 3-D: medpy's connectivity 1); outside the array counts as background, as in
    scipy's binary_erosion."""
    p = F.pad(mask.to(torch.uint8), (1, 1) * mask.dim()).bool()
    inner = (slice(1, -1),) * mask.dim()
    eroded = p[inner].clone()
    for axis in range(mask.dim()):
        for side in (slice(None, -2), slice(2, None)):
            eroded &= p[inner[:axis] + (side,) + inner[axis + 1:]]
    return mask & ~eroded


def _distances_to(points, target, spacing):
    """Exact Euclidean distance, in units of `spacing` (one length per axis), from each point (a row of indices
    in `points`) to the nearest True element of the 2-D or 3-D `target`: the separable passes of an exact
    distance transform, on squared distances (inf along lines that hold no target element).
    1. Along axis 0, two cumulative scans: the distance to the nearest target element in the same column.
    2. (3-D) Along axis 1, every pair within a line: g²(i, j, k) = min over j' of g²(i, j', k) + ((j - j') s₁)².
    3. Along the last axis, at the query points only: d² = min over c' of g²(..., c') + ((c - c') s_last)²."""
    n = target.shape[0]
    rows = torch.arange(n, device=target.device).view(-1, *[1] * (target.dim() - 1)).expand(target.shape)
    above = torch.where(target, rows, torch.full_like(rows, -n)).cummax(0).values
    below = n - 1 - torch.where(target, n - 1 - rows, torch.full_like(rows, -n)).flip(0).cummax(0).values.flip(0)
    g = torch.minimum(rows - above, below - rows).float()  # >= n where the column holds no target element
    g2 = torch.where(g >= n, torch.inf, (g * spacing[0]) ** 2)
    if target.dim() == 3:
        J, K = target.shape[1:]
        j = torch.arange(J, device=target.device, dtype=torch.float32)
        dj2 = ((j[:, None] - j[None, :]) * spacing[1]) ** 2  # (J, J')
        step = max(1, 2 ** 24 // (J * J * K))  # (step, J, J', K) per chunk: at most 64 MB
        g2 = torch.cat([(g2[i:i + step, None] + dj2[None, :, :, None]).amin(2) for i in range(0, n, step)])
    last = torch.arange(target.shape[-1], device=target.device, dtype=torch.float32)
    out = []
    for chunk in points.split(8192):  # (q, last) per chunk keeps memory at a few tens of MB
        d2 = g2[tuple(chunk[:, :-1].T)] + ((chunk[:, -1:].float() - last) * spacing[-1]) ** 2
        out.append(d2.min(1).values.sqrt())
    return torch.cat(out)


def hd95(pred, target, spacing=None):
    """95th percentile of the pooled surface distances A→B and B→A (medpy.metric.binary.hd95) between 2-D or
    3-D masks, in pixels, or in mm with `spacing` (the voxel size along each axis). Both empty: 0. Exactly
    one empty: nan, undefined (medpy raises; see the rules above)."""
    pred, target = _as_bool(pred), _as_bool(target)
    spacing = (1.0,) * pred.dim() if spacing is None else tuple(float(s) for s in spacing)
    has_p, has_t = bool(pred.any()), bool(target.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return math.nan
    # every surface element lies in the bounding box of the two masks: the distances are computed there
    low, high = (pred | target).nonzero().aminmax(dim=0)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(low.tolist(), high.tolist()))
    sp, st = _surface(pred[box]), _surface(target[box])
    d = torch.cat([_distances_to(sp.nonzero(), st, spacing), _distances_to(st.nonzero(), sp, spacing)])
    return float(torch.quantile(d, 0.95))  # linear interpolation, as numpy.percentile


def _mean(values):
    """The mean of the values that are not None; None where there are none."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def score(pred, target, num_classes, spacing=None, **key):
    """One row of metrics.json: Dice and HD95 of each class 1..C between two label maps of class ids (a 2-D
    image, or a 3-D volume with its spacing), their means over the classes (HD95: over the classes where
    it is defined), and the classes whose HD95 is undefined: missed (present, not predicted) or false alarms."""
    dices, hds, missed, false_alarms = [], [], [], []
    for c in range(1, num_classes + 1):
        p, t = pred == c, target == c
        dices.append(dice(p, t))
        h = hd95(p, t, spacing)
        hds.append(None if math.isnan(h) else h)
        if math.isnan(h):
            (missed if bool(t.any()) else false_alarms).append(c)
    return dict(key, dice=float(np.mean(dices)), hd95=_mean(hds), dice_per_class=dices, hd95_per_class=hds,
                missed=missed, false_alarm=false_alarms)


def by_case(image_rows):
    """2-D images of one case (files CASE__*.png, see data.case_of) make one row: per class, the means over
    its images. A case of one image is that image's row."""
    cases = {}
    for row in image_rows:
        cases.setdefault(row["case"], []).append(row)
    out = []
    for case, rows in cases.items():
        if len(rows) == 1:
            out.append(dict(rows[0], case=case))
            continue
        d = [float(np.mean(v)) for v in zip(*(r["dice_per_class"] for r in rows))]
        h = [_mean(v) for v in zip(*(r["hd95_per_class"] for r in rows))]
        out.append(dict(case=case, images=len(rows), dice=float(np.mean(d)), hd95=_mean(h), dice_per_class=d,
                        hd95_per_class=h, missed=[c for r in rows for c in r["missed"]],
                        false_alarm=[c for r in rows for c in r["false_alarm"]]))
    return out


def summarise(case_rows):
    """What metrics.json and the tables report: the mean over cases of each case's Dice and HD95 (nan where
    no case has an HD95), the per-class means over cases, and how many HD95 were undefined."""
    hd = _mean([r["hd95"] for r in case_rows])
    return dict(dice=float(np.mean([r["dice"] for r in case_rows])), hd95=math.nan if hd is None else hd,
                dice_per_class=[_mean(v) for v in zip(*(r["dice_per_class"] for r in case_rows))],
                hd95_per_class=[_mean(v) for v in zip(*(r["hd95_per_class"] for r in case_rows))],
                hd95_undefined=dict(missed=sum(len(r["missed"]) for r in case_rows),
                                    false_alarm=sum(len(r["false_alarm"]) for r in case_rows)))


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, images, batch_size):
    """(N, 3, W, W) -> float logits (N, C+1, W/f, W/f), f the model's output stride (SAM: 4). W = S (the
    model's input): one pass per image. W = Z*S: overlapping S x S tiles at stride S/2 ((2Z-1)^2 of them),
    whose logits are blended with a tent window (tile centres weigh more than their borders, so no seams)."""
    was_training = model.training
    model.eval()
    S, W = model.img_size, images.shape[-1]
    starts = list(range(0, W - S + 1, S // 2)) if W > S else [0]
    tiles = [(r, c) for r in starts for c in starts]
    crops = torch.stack([images[:, :, r:r + S, c:c + S] for r, c in tiles], 1).flatten(0, 1)  # (N*T, 3, S, S)
    out = []
    for i in range(0, len(crops), batch_size):
        chunk = crops[i:i + batch_size]
        n = len(chunk)
        if n < batch_size < len(crops):  # a short last batch, zero-padded: one input shape (cuDNN tunes once)
            chunk = torch.cat([chunk, chunk.new_zeros(batch_size - n, *chunk.shape[1:])])
        # compiled blocks run eagerly here: compiling them for eval mode and no_grad costs more than it saves
        with autocast(images.device), torch.compiler.set_stance("force_eager"):
            out.append(model(chunk)[:n].float())
    logits = torch.cat(out).unflatten(0, (len(images), len(tiles)))  # (N, T, C+1, S/4, S/4)
    model.train(was_training)
    if len(tiles) == 1:
        return logits[:, 0]
    s = logits.shape[-1]
    f = S // s  # output stride
    tent = 1 - 0.9 * torch.linspace(-1, 1, s, device=images.device).abs()
    weight = tent[:, None] * tent[None, :]  # (s, s)
    canvas = logits.new_zeros(len(images), logits.shape[2], W // f, W // f)
    total = logits.new_zeros(W // f, W // f)
    for t, (r, c) in enumerate(tiles):
        canvas[:, :, r // f:r // f + s, c // f:c // f + s] += logits[:, t] * weight
        total[r // f:r // f + s, c // f:c // f + s] += weight
    return canvas / total


@torch.no_grad()
def evaluate(model, split, batch_size):
    """Dice and HD95 of every foreground class, per case, on masks at their original resolution (inside the
    field of view where the data have one): a 2-D image is scored alone (images of one case are averaged,
    by_case); the slices of a volume are stacked back into it and scored in 3-D with its voxel spacing (mm).
    The images come to the device `batch_size` at a time, and the predicted masks go to CPU memory as they
    are made. Returns summarise's means with the per-image (2-D) and per-case rows, and the masks."""
    device, C = model.pixel_mean.device, model.num_classes
    image_rows, case_rows, preds, stack = [], [], [], []
    progress = Progress("evaluation", len(split), unit="image", log=False)  # its result is one line
    for start in range(0, len(split), batch_size):
        logits = predict(model, split.images[start:start + batch_size].to(device), batch_size)  # (b, C+1, W/4, W/4)
        for i, lg in enumerate(logits, start):
            progress.update(i + 1)
            gt, fov = split.orig_masks[i].to(device), split.fovs[i]
            pred = F.interpolate(lg[None], gt.shape, mode="bilinear", align_corners=False).argmax(1)[0].to(torch.uint8)
            if fov is not None:
                fov = fov.to(device)
                pred, gt = pred * fov, gt * fov
            preds.append(pred.cpu())
            case = split.cases[i]
            if not split.volumes:
                image_rows.append(score(pred, gt, C, name=split.names[i], case=case))
                continue
            stack.append((pred, gt))  # a slice: scored with the rest of its volume
            if i + 1 == len(split) or split.cases[i + 1] != case:
                pred_volume, gt_volume = (torch.stack(s, -1) for s in zip(*stack))  # (H, W, slices)
                case_rows.append(score(pred_volume, gt_volume, C, split.volumes[case]["spacing"], case=case))
                stack = []
    progress.close()
    case_rows = case_rows or by_case(image_rows)
    return dict(summarise(case_rows), hd95_unit="mm" if split.volumes else "px", per_image=image_rows,
                per_case=case_rows), preds

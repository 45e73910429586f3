"""Run methods x datasets x seeds and write the results table and plot.

    python train.py --methods lora salt --data drive synthetic --seeds 0 1 2 --data-root data/DRIVE

Each combination is one run of the method's own script (`python lora.py --data drive --seed 0 ...`), so
what the table shows is exactly what those commands produce. A run whose metrics.json already exists is
not run again (delete its folder, or pass --force), so an interrupted sweep continues where it stopped.
A method may carry its own arguments: --methods lora "salt --rank 256".
Writes results.md (mean ± std over seeds per method and dataset, beside the paper's number where one
exists), results.png (Dice against trainable parameters) and, for DRIVE runs, results_panel.png (each
method's prediction on the first test image).
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("lora", "atrous_lora", "salt", "balr_sam", "samora", "unet")
# Numbers the papers report on DRIVE (SALT, arXiv 2503.16055, Table 1: 14/6 split, SAM ViT-B, 512 input).
PAPER_DRIVE = {"lora": (0.62, None), "salt --rank 4": (0.72, 16.04), "salt --rank 256": (0.75, 13.20),
               "salt --rank 256 --reg-weight 0.01": (0.75, 13.20)}  # the paper's text: weight 0.01


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["lora"],
                   help=f"method scripts ({', '.join(METHODS)}), each optionally with its arguments in quotes")
    p.add_argument("--data", nargs="+", default=["synthetic"], choices=["synthetic", "drive", "folder"])
    p.add_argument("--data-root", default=None, help="dataset folder for drive/folder")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="runs", help="folder of run folders")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at once on one GPU (a MobileSAM run at batch 8 keeps an H200 busy: four at a time "
                        "each took 143 s of training where one alone takes 41 s, 15%% more runs per hour)")
    p.add_argument("--force", action="store_true", help="run again even where metrics.json exists")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.md/png from the run folders")
    p.add_argument("--results", default="results", help="stem of the table and plot files")
    p.add_argument("--class-names", nargs="+", default=None, metavar="NAME",
                   help="names of classes 1..C for the per-class table (default: class 1, class 2, ...)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments passed to every run")
    return p.parse_args(argv)


def slug(spec):
    """'salt --rank 256' -> 'salt_rank_256': the run-name part of a method with its arguments."""
    parts = shlex.split(spec)
    return "_".join([parts[0]] + [a.lstrip("-").replace("-", "") for a in parts[1:]])


def planned_runs(args):
    from cli import last_checkpoint
    extra = [a for a in args.extra if a != "--"]
    for spec in args.methods:
        script = shlex.split(spec)[0]
        if script not in METHODS:
            sys.exit(f"error: unknown method {script!r}; choose from {', '.join(METHODS)}.")
        for data in args.data:
            for seed in args.seeds:
                name = f"{slug(spec)}_{data}_s{seed}"
                root = ["--data-root", args.data_root] if data != "synthetic" and args.data_root else []
                cmd = [sys.executable, f"{script}.py", *shlex.split(spec)[1:], "--data", data, *root,
                       "--seed", str(seed), "--out", args.out, "--run-name", name, *extra]
                folder = Path(args.out) / name  # an interrupted run continues from its last.pt, or its first stage's
                last = last_checkpoint(folder)
                if args.force:
                    cmd.append("--overwrite")
                elif last and not (folder / "metrics.json").is_file():
                    cmd += ["--resume", str(last)]  # where it stopped
                yield spec, data, seed, name, cmd


def run_all(args):
    todo = [r for r in planned_runs(args) if args.force or not (Path(args.out) / r[3] / "metrics.json").is_file()]
    print(f"{len(todo)} runs to do")
    running, failed = {}, []  # proc -> (number, name, log)

    def finish(proc):  # say how a run ended: its test line, or that it failed
        number, name, log = running.pop(proc)
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(("test (", "error:"))]
        ok = proc.returncode == 0
        if not ok:
            failed.append(name)
        print(f"[{number}/{len(todo)}] {name}: {lines[-1] if lines else ('done' if ok else 'failed')}", flush=True)

    for number, (spec, data, seed, name, cmd) in enumerate(todo, 1):
        while len(running) >= args.parallel:  # wait for a free slot
            time.sleep(1)
            for proc in [p for p in running if p.poll() is not None]:
                finish(proc)
        log = Path(args.out) / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{number}/{len(todo)}] $", " ".join(shlex.quote(c) for c in cmd[1:]), f"  > {log}", flush=True)
        running[subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)] = (number, name, log)
    while running:
        proc = next(iter(running))
        proc.wait()
        finish(proc)
    return failed


def report(args):
    rows = {}
    for spec, data, seed, name, cmd in planned_runs(args):
        f = Path(args.out) / name / "metrics.json"
        if f.is_file():
            rows.setdefault((spec, data), []).append((json.loads(f.read_text()), cmd, name))
    if not rows:
        if args.report_only:
            from data import UserError
            raise UserError(f"no finished runs under {args.out} to report (no <run>/metrics.json for these methods and "
                            "seeds): run them first (train.py without --report-only), or point --out at their folder.")
        print("no finished runs to report")
        return
    # no times here: runs of one table may have shared a GPU; benchmarks/bench.py measures speed
    lines = ["| method | data | model | Dice (mean ± std) | HD95 px (mean ± std) | paper Dice / HD95 | trainable params "
             "| peak GiB | seeds |", "|" + "---|" * 9]
    for (spec, data), runs in rows.items():
        ms = [m for m, *_ in runs]

        def stat(key, fmt):
            vals = [m[key] for m in ms]
            if len(vals) == 1:  # no spread from one seed
                return f"{vals[0]:{fmt}} (one seed)"
            return f"{statistics.mean(vals):{fmt}} ± {statistics.stdev(vals):{fmt}}"
        paper = PAPER_DRIVE.get("salt --rank 4" if spec == "salt" else spec) if data == "drive" else None
        paper_s = "–" if paper is None else f"{paper[0]:.2f} / {paper[1] if paper[1] else '–'}"
        m0 = ms[0]
        peak = f"{statistics.mean(m['peak_mem_gib'] for m in ms):.1f}" if m0["peak_mem_gib"] else "cpu"
        lines.append(f"| `{spec}` | {data} | {m0['model']} | {stat('dice', '.4f')} | {stat('hd95', '.2f')} | {paper_s} | "
                     f"{m0['trainable_params']:,} ({m0['trainable_percent']:.2f}%) | {peak} | {len(ms)} |")
    lines += per_class_table(rows, args.class_names)
    commands = sorted({" ".join(shlex.quote(c) for c in cmd[1:]).replace(f"--seed {m['seed']}", "--seed S")
                       .replace(f"_s{m['seed']}", "_sS") for runs in rows.values() for m, cmd, _ in runs})
    gpu = next((m["versions"].get("gpu") for runs in rows.values() for m, *_ in runs if "gpu" in m["versions"]), "CPU")
    text = "\n".join(lines) + f"\n\nMachine: {gpu}. Each row is mean ± std over the seeds listed, of:\n\n" + \
        "\n".join(f"    {c}" for c in commands) + "\n"
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)  # e.g. RESULTS=DIR in scripts/results.sh
    Path(f"{args.results}.md").write_text(text)
    print(text)
    plot(rows, f"{args.results}.png", f"{gpu}; mean ± std over seeds; each run's command: {Path(args.results).name}.md")
    panel(rows, args, f"{args.results}_panel.png")


def per_class_table(rows, names=None):
    """Dice per class (metrics.json's dice_per_class: the mean over test cases), mean ± std over seeds, for
    the rows with more than one class; HD95 of volumes is in mm (hd95_unit), of 2-D images in pixels."""
    multi = {key: [m for m, *_ in runs] for key, runs in rows.items() if len(runs[0][0].get("dice_per_class") or []) > 1}
    if not multi:
        return []
    n = max(len(ms[0]["dice_per_class"]) for ms in multi.values())
    names = [names[c] if names and c < len(names) else f"class {c + 1}" for c in range(n)]
    lines = ["", "Dice per class (mean over the test cases; mean ± std over seeds):", "",
             "| method | data | " + " | ".join(names) + " | HD95 |", "|" + "---|" * (n + 3)]
    for (spec, data), ms in multi.items():
        def cell(values, fmt):
            values = [v for v in values if v is not None]
            if len(values) < 2:
                return f"{values[0]:{fmt}}" if values else "–"
            return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"
        dice = [cell([m["dice_per_class"][c] for m in ms if c < len(m["dice_per_class"])], ".3f") for c in range(n)]
        hd95 = cell([m["hd95"] for m in ms], ".2f") + f" {ms[0].get('hd95_unit', 'px')}"
        lines.append(f"| `{spec}` | {data} | " + " | ".join(dice) + f" | {hd95} |")
    return lines


def panel(rows, args, path, columns=4):
    """The first DRIVE test image, its ground truth, and each method's prediction from its first seed
    (read from the run's test_masks/), coloured TP white, FP red, FN blue, with that image's Dice."""
    drive = [(spec, runs[0]) for (spec, data), runs in rows.items() if data == "drive"]
    # the masks are not committed: a method whose first run is not on this disk is left out, and named
    missing = [spec for spec, (_, _, name) in drive if not (Path(args.out) / name / "test_masks").is_dir()]
    drive = [(spec, run) for spec, run in drive if spec not in missing]
    folders = [Path(args.out) / name / "test_masks" for _, (_, _, name) in drive]
    if not drive or not args.data_root:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image
    from data import load_drive
    _, (names, images, masks, fovs) = load_drive(args.data_root, drive[0][1][0]["args"].get("split", "salt"))
    gt, fov = masks[0] > 0, fovs[0]
    n = 2 + len(drive)
    nrows = (n + columns - 1) // columns
    fig, axes = plt.subplots(nrows, columns, figsize=(3.2 * columns, 3.4 * nrows), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(images[0])
    axes[0].set_title(f"DRIVE image {names[0]}", fontsize=9)
    axes[1].imshow(gt & fov, cmap="gray")
    axes[1].set_title("ground truth", fontsize=9)
    for ax, (spec, (m, _, name)), folder in zip(axes[2:], drive, folders):
        pred = (np.array(Image.open(folder / f"{names[0]}.png")) > 0) & fov
        overlay = np.zeros(gt.shape + (3,))
        overlay[pred & gt] = 1
        overlay[pred & ~gt] = (1, 0.2, 0.2)
        overlay[~pred & gt] = (0.2, 0.4, 1)
        ax.imshow(overlay)
        image_dice = next(r["dice"] for r in m["per_image"] if r["name"] == names[0])
        ax.set_title(f"{spec} (seed {m['seed']}): Dice {image_dice:.3f}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("white: true positive, red: false positive, blue: missed vessel"
                 + (f"; not shown (test masks not at hand): {', '.join(missing)}" if missing else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot(rows, path, caption):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    colours, variants = {}, {}  # one colour per method script, one marker per configuration of it
    for (spec, data), runs in rows.items():
        ms = [m for m, *_ in runs]
        x = ms[0]["trainable_params"] / 1e6
        y = statistics.mean(m["dice"] for m in ms)
        err = statistics.stdev([m["dice"] for m in ms]) if len(ms) > 1 else 0
        script = spec.split()[0]
        colour = colours.setdefault(script, f"C{len(colours) % 10}")
        variants[script] = variants.get(script, -1) + 1
        marker = "osD^v<>"[variants[script] % 7]
        ax.errorbar([x], [y], yerr=[err], fmt=marker, color=colour, capsize=3, label=f"{spec} ({data})")
    xs = [runs[0][0]["trainable_params"] for runs in rows.values()]
    if max(xs) > 10 * min(xs):  # a log axis only where the counts span orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (millions)")
    ax.set_ylabel("test Dice")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.text(0.01, 0.01, caption, fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    failed = [] if args.report_only else run_all(args)
    report(args)
    if failed:
        sys.exit(f"error: {len(failed)} runs failed ({', '.join(failed)}); see their .log files in {args.out}.")


if __name__ == "__main__":
    from cli import main_guard
    main_guard(main)  # a bad input (e.g. a missing --data-root for the panel) ends in one sentence, exit 2

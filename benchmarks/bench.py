"""Speed and memory of every method, in one run on one GPU: training and inference images/s, peak memory,
compilation time, FLOPs per image counted in code, and model FLOPs utilisation (MFU) against a bf16
matrix-multiply peak measured in the same run. Every speed-up is a ratio taken within one run.

What one row measures (model x method x config x batch):
* train: AdamW steps of the method's loss on random images (B, 3, S, S) and masks already on the device
  (no data pipeline, no augmentation). After --warmup steps (each timed alone: the first ones compile),
  --windows windows of --steps steps are timed (synchronize + perf_counter around each window, no sync
  inside); images/s is batch / the median step time. compile_s = time of the warm-up steps minus as many
  steady steps (a lower bound: anything that a warm-up step adds beyond compilation counts too).
* infer: the same for the forward pass in eval mode under no_grad.
* peak memory: torch.cuda.max_memory_allocated, reset before training and before inference (it includes
  the weights, the optimiser state and, for training, the gradients).
* FLOPs: torch.utils.flop_counter over one forward + loss + backward at batch 1 of the *stock* model (fp32,
  eager, SAM's own attention): the model's FLOPs, the basis of MFU for every config, so that extra work a
  config does (the fast path's wider q.k, say) is not credited. `exec TFLOP` is what the config itself
  executes (counted with SDPA's math backend, whose matmuls are the fused kernels' FLOPs).
* MFU = model FLOPs per image x images/s / the measured bf16 matmul peak (8192^3, random data).

Configs are named by tokens joined with "_": stock|fast, then compile and ckpt. stock: segment_anything's
own forwards and a plain eager step (what --no-fast runs); fast: the fast layer (fast.apply and its training
step: fused attention kernels, LoRA inside the qkv matmul, frozen weights in bf16, the step replayed from a
CUDA graph); compile: common.compile_blocks (per-block torch.compile); ckpt: --grad-checkpoint (with fast,
the fast layer's selective policy). Every config trains under bf16 autocast on CUDA (fp32 on the CPU), as a
run does. Compiled configs run on CUDA only; on the CPU they are recorded as skipped.

Run (GPU). A 10-minute call holds about one model's worth of rows (compiled rows spend most of their time
compiling); --max-seconds stops starting new rows in time, and the JSON is rewritten after every row:
    python benchmarks/bench.py --models vit_b --out runs/bench_vit_b
    python benchmarks/bench.py --models mobile_sam --configs stock,stock_compile,fast,fast_ckpt --out runs/bench_ms
    python benchmarks/bench.py --merge runs/bench_vit_b/bench.json runs/bench_ms/bench.json --out runs/bench
CPU smoke test:  python benchmarks/bench.py --model tiny --quick --batches 1 --configs stock,fast
Writes --out/bench.json (every row, with the run's configuration and versions) and --out/bench.md.
"""
import argparse
import contextlib
import gc
import importlib
import io
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import fast  # noqa: E402
from data import UserError  # noqa: E402

DEFAULT_CONFIGS = "stock,stock_compile,fast_compile,fast_compile_ckpt"
TOKENS = {"compile", "ckpt"}

# How each method file adapts a loaded SAM, from its own arguments (their inject() signatures differ),
# and the loss it trains with (None: common.default_loss).
ADAPTERS = {
    "lora": (lambda mod, model, a: mod.inject(model, a.rank), None),
    "salt": (lambda mod, model, a: mod.inject(model, a), lambda mod, a: mod.make_loss(a.reg_weight)),
    "atrous_lora": (lambda mod, model, a: mod.inject(model, a.rank, mod.parse_rates(a.rates)), None),
    "balr_sam": (lambda mod, model, a: mod.inject(model, a.rank, a.decoder_rank, a.cden_width), None),
    "samora": (lambda mod, model, a: mod.inject(model, a.rank, a.hl_width, a.hl_heads), None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", "--model", default="vit_b,mobile_sam",
                   help="comma-separated base models (vit_* with --checkpoint, tiny for CPU smoke tests)")
    p.add_argument("--checkpoint", default="none", help="weights of vit_* models ('none': random, for speed)")
    p.add_argument("--methods", default="lora", help=f"comma-separated method files to time: {','.join(ADAPTERS)}")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated configs, each stock|fast, optionally followed by _compile and _ckpt")
    p.add_argument("--batches", default="1,4,8", help="comma-separated training and inference batch sizes")
    p.add_argument("--img-size", type=int, default=None, help="input size (default 1024; tiny: 128)")
    p.add_argument("--warmup", type=int, default=3, help="untimed-for-speed warm-up steps (compilation happens here)")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median window gives the speed")
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--no-inference", action="store_true", help="time training only")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs (and MFU)")
    p.add_argument("--peak-size", type=int, default=None,
                   help="side of the square matmul that measures the peak (default 8192 on CUDA, 512 on CPU)")
    p.add_argument("--baseline", default="stock",
                   help="config that the speed-up column divides by (same model, method and batch)")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="start no new row after this many seconds (0: no limit); later rows are recorded as skipped")
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                   help="torch._inductor.config settings for the compiled configs, e.g. triton.autotune_pointwise=False")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up step, 2 windows of 1 step")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of an earlier bench.json in --out (rows measured again replace them)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: join the rows of these bench.json files (later ones win) into --out")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.windows, args.steps = 1, 2, 1
    args.models = args.models.split(",")
    args.methods = args.methods.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.configs = args.configs.split(",")
    for m in args.methods:
        if m not in ADAPTERS:
            raise UserError(f"--methods {m} is not a method file; choose from {', '.join(ADAPTERS)}.")
    for c in args.configs:
        parse_config(c)
    for item in args.inductor:
        import ast
        import torch._inductor.config
        key, _, value = item.partition("=")
        *path, name = key.split(".")
        target = torch._inductor.config
        for part in path:
            target = getattr(target, part, None)
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            target = None
        if target is None or not hasattr(target, name) or not value:
            raise UserError(f"--inductor {item}: not a torch._inductor.config setting as KEY=VALUE (VALUE a Python "
                            f"literal); e.g. triton.autotune_pointwise=False.")
        setattr(target, name, parsed)
    return args


def parse_config(name):
    attention, *tokens = name.split("_")
    if attention not in ("stock", "fast") or not set(tokens) <= TOKENS:
        raise UserError(f"config {name!r} is not stock|fast followed by _-joined tokens from {sorted(TOKENS)}; "
                        f"e.g. fast_compile.")
    return dict(fast=attention == "fast", compile="compile" in tokens, ckpt="ckpt" in tokens)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n, device):
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t


def matmul_peak(device, size):
    """FLOP/s of a (size x size) @ (size x size) matmul: bf16 on CUDA (the tensor-core peak MFU is taken
    against), fp32 on the CPU. Random data: zeros would let the hardware idle part of the datapath."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    n = 20 if device.type == "cuda" else 3
    timed(lambda: a @ b, 3, device)
    best = min(timed(lambda: a @ b, n, device) / n for _ in range(3))
    return dict(flops_per_s=2 * size ** 3 / best, size=size, dtype=str(dtype).replace("torch.", ""))


def build(method, mod, margs, cfg, device, quiet=True):
    """A fresh model as a run builds it (common.build_model: base weights, the method's adapter, then the
    config's checkpointing and fast layer), compiled where the config says."""
    torch.manual_seed(0)
    margs.no_fast, margs.grad_checkpoint, margs.no_compile = not cfg["fast"], cfg["ckpt"], not cfg["compile"]
    inject, _ = ADAPTERS[method]
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        # quiet: a method's summary is printed once per model, not once per row
        model = common.build_model(margs, device, lambda m: inject(mod, m, margs))
    if cfg["compile"]:
        common.compile_blocks(model)
    return model


def random_batch(batch, size, num_classes, device):
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, size, size, device=device, generator=g)
    masks = torch.randint(0, num_classes + 1, (batch, size, size), device=device, generator=g, dtype=torch.uint8)
    return images, masks


def count_flops(model, loss_fn, size, num_classes, device, train=True):
    """FLOPs of one image: forward + loss + backward (train) or forward (inference), fp32, eager, with SDPA
    on its math backend (plain matmuls the counter knows on every device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    images, masks = random_batch(1, size, num_classes, device)
    model.train(train)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if train:
            loss_fn(model, images, masks).backward()
        else:  # with grad enabled (the counter's module hooks fail under no_grad); nothing runs backward
            model(images)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure_loop(step, batch, args, device):
    """Warm-up steps timed one by one, then the median of the timed windows."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = [timed(step, 1, device) for _ in range(args.warmup)]
    per_step = statistics.median(timed(step, args.steps, device) / args.steps for _ in range(args.windows))
    return dict(imgs_per_s=batch / per_step, step_ms=1000 * per_step, first_steps_s=first,
                compile_s=max(0.0, sum(first) - len(first) * per_step),
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None)


def measure(method, mod, margs, cfg, batch, args, device, count_exec):
    """One row. Training and inference each in their own try, so an OOM in training keeps inference."""
    row = {}
    model = build(method, mod, margs, cfg, device)
    make_loss = ADAPTERS[method][1]
    loss_fn = make_loss(mod, margs) if make_loss else common.default_loss
    if count_exec:  # eager only: the counter does not see inside compiled code
        row["exec_flops_train"] = count_flops(model, loss_fn, margs.img_size, margs.num_classes, device)
    images, masks = random_batch(batch, margs.img_size, margs.num_classes, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # as common.train_loop: fused AdamW on CUDA, the fast layer's step or the plain one
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    one_step = (fast.training_step if cfg["fast"] else common.TrainStep)(model, loss_fn, optimizer, device)

    def train_step():
        one_step(images, masks)

    def infer_step():
        with torch.no_grad(), common.autocast(device):
            model(images)

    for part, step, mode in (("train", train_step, True), ("infer", infer_step, False)):
        if part == "infer" and args.no_inference:
            continue
        model.train(mode)
        try:
            row[part] = measure_loop(step, batch, args, device)
        except torch.OutOfMemoryError:
            row[part] = dict(error="out of memory")
        except Exception as e:  # a failure of one config must not lose the others
            traceback.print_exc()
            row[part] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        optimizer.zero_grad(set_to_none=True)
        if part == "train":
            optimizer.state.clear()  # inference memory without the optimiser's moments
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return row


def free(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def markdown(result):
    rows = result["rows"]
    peak = result["meta"]["peak"]
    lines = [f"Device: {result['meta']['device']}; matmul peak {peak['flops_per_s'] / 1e12:.3g} TFLOP/s "
             f"({peak['dtype']}, {peak['size']}^3); torch {result['meta']['versions']['torch']}. "
             f"Speed-up: training images/s over `{result['meta']['baseline']}` at the same batch.", "",
             "| model | method | config | batch | train img/s | speed-up | train peak GiB | compile s | "
             "infer img/s | infer peak GiB | GFLOP/img (exec) | MFU train | MFU infer |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    speed = {(r["model"], r["method"], r["config"], r["batch"]): r.get("train", {}).get("imgs_per_s") for r in rows}
    for r in rows:
        tr, inf = r.get("train", {}), r.get("infer", {})
        base = speed.get((r["model"], r["method"], result["meta"]["baseline"], r["batch"]))
        ratio = tr.get("imgs_per_s") / base if tr.get("imgs_per_s") and base else None
        flops = r.get("model_flops_train")
        exec_flops = r.get("exec_flops_train")
        gflop = "–" if flops is None else f"{flops / 1e9:.4g}" + (f" ({exec_flops / 1e9:.4g})" if exec_flops else "")
        compile_s = [x.get("compile_s") for x in (tr, inf) if x.get("compile_s") is not None]
        if r.get("status"):  # skipped, or failed before measuring
            lines.append(f"| {r['model']} | {r['method']} | {r['config']} | {r['batch']} | {r['status']} |||||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['method']} | {r['config']} | {r['batch']} | "
            f"{fmt(tr.get('imgs_per_s'), '.1f') if 'imgs_per_s' in tr else tr.get('error', '–')} | "
            f"{fmt(ratio, '.2f')}{'×' if ratio else ''} | {fmt(tr.get('peak_gib'), '.1f')} | "
            f"{fmt(sum(compile_s) if compile_s else None, '.1f')} | "
            f"{fmt(inf.get('imgs_per_s'), '.1f') if 'imgs_per_s' in inf else inf.get('error', '–')} | "
            f"{fmt(inf.get('peak_gib'), '.1f')} | {gflop} | {fmt(r.get('mfu_train'), '.1%')} | "
            f"{fmt(r.get('mfu_infer'), '.1%')} |")
    return "\n".join(lines) + "\n"


def write(result, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(markdown(result))


def merge(files, out):
    """Rows of several runs (e.g. one GPU call per model) in one table; each row keeps its own device and peak."""
    results = [json.loads(Path(f).read_text()) for f in files]
    rows = {}
    for r in results:
        for row in r["rows"]:
            rows[tuple(row[k] for k in ("model", "method", "config", "batch"))] = row
    result = dict(meta=dict(results[-1]["meta"], merged=[str(f) for f in files]), rows=list(rows.values()))
    write(result, out)
    print(f"merged {len(rows)} rows into {out / 'bench.json'} and {out / 'bench.md'}")
    return result


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.merge:
        return merge(args.merge, out)
    device = cli.pick_device(args)
    start = time.perf_counter()
    peak = matmul_peak(device, args.peak_size or (8192 if device.type == "cuda" else 512))
    print(f"matmul peak: {peak['flops_per_s'] / 1e12:.3g} TFLOP/s ({peak['dtype']}, {peak['size']}^3)")
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", peak=peak,
                baseline=args.baseline, versions=cli.versions(),
                args={k: v for k, v in vars(args).items() if k != "device_resolved"})
    rows = []
    if args.append and (out / "bench.json").is_file():
        rows = json.loads((out / "bench.json").read_text())["rows"]
    result = dict(meta=meta, rows=rows)

    def put(row):
        key = tuple(row[k] for k in ("model", "method", "config", "batch"))
        rows[:] = [r for r in rows if tuple(r[k] for k in ("model", "method", "config", "batch")) != key] + [row]
        write(result, out)

    for model_name in args.models:
        for method in args.methods:
            mod = importlib.import_module(method)
            margs = mod.parse_args(["--model", model_name, "--checkpoint", args.checkpoint, "--device",
                                    device.type] + (["--img-size", str(args.img_size)] if args.img_size else []))
            cli.setup(margs, method, gpu_steps=1)
            flops = {}
            if not args.no_flops:  # the model's FLOPs: stock, fp32, eager (the basis of MFU)
                model = build(method, mod, margs, parse_config("stock"), device, quiet=False)
                make_loss = ADAPTERS[method][1]
                loss_fn = make_loss(mod, margs) if make_loss else common.default_loss
                flops = dict(model_flops_train=count_flops(model, loss_fn, margs.img_size, margs.num_classes, device),
                             model_flops_infer=count_flops(model, loss_fn, margs.img_size, margs.num_classes,
                                                           device, train=False))
                print(f"{model_name} {method}: {flops['model_flops_train'] / 1e9:.4g} GFLOP per training image, "
                      f"{flops['model_flops_infer'] / 1e9:.4g} per inference image")
                del model
                free(device)
            exec_flops = {}  # config -> FLOPs it executes per training image
            for config in args.configs:
                cfg = parse_config(config)
                for batch in args.batches:
                    row = dict(model=model_name, method=method, config=config, batch=batch, img_size=margs.img_size,
                               device=meta["device"], peak_flops_per_s=peak["flops_per_s"], **flops)
                    if cfg["compile"] and device.type != "cuda":
                        row["status"] = "skipped: compile runs on CUDA only"
                    elif args.max_seconds and time.perf_counter() - start > args.max_seconds:
                        row["status"] = f"skipped: past --max-seconds {args.max_seconds:g}"
                    else:
                        print(f"{model_name} {method} {config} batch {batch} ...", end=" ", flush=True)
                        count_exec = not args.no_flops and not cfg["compile"] and config not in exec_flops
                        try:
                            row.update(measure(method, mod, margs, cfg, batch, args, device, count_exec))
                        except torch.OutOfMemoryError:
                            row["status"] = "out of memory"
                        except Exception as e:
                            traceback.print_exc()
                            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                        free(device)
                        if "exec_flops_train" in row:  # per image: the same at every batch size
                            exec_flops[config] = row["exec_flops_train"]
                        elif config in exec_flops:
                            row["exec_flops_train"] = exec_flops[config]
                        for part in ("train", "infer"):
                            ips, f = row.get(part, {}).get("imgs_per_s"), row.get(f"model_flops_{part}")
                            if ips and f:
                                row[f"mfu_{part}"] = f * ips / peak["flops_per_s"]
                        tr, inf = row.get("train", {}), row.get("infer", {})
                        print(row.get("status") or f"train {fmt(tr.get('imgs_per_s'), '.2f')} img/s "
                              f"{tr.get('error', '')}, infer {fmt(inf.get('imgs_per_s'), '.2f')} img/s "
                              f"{inf.get('error', '')}, peak {fmt(tr.get('peak_gib'), '.1f')} GiB")
                    put(row)
            free(device)
    write(result, out)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} ({time.perf_counter() - start:.0f} s)")
    return result


if __name__ == "__main__":
    cli.main_guard(main)

"""Time the Atrous Attention Module alone, forward + backward under bf16 autocast, on the bottleneck shapes
MobileSAM's TinyViT hands it at 1024 and batch 8, in several forms: reference() (branch by branch, eight
convs), forward() (the spatial branches as one conv, the pooled branch as a bias), each also in fp32 and
(in bf16) compiled; then a profile of reference() (where the time goes: CPU or GPU). Writes a JSON; needs a CUDA GPU.

    python scripts/aam_speed.py --out runs/aam_speed.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atrous_lora  # noqa: E402

# (windows of a batch of 8, window side): TinyViT stage 2 (128x128 grid, 7x7 windows -> 19x19 per image),
# stage 3 (64x64, 14x14 windows -> 5x5), stage 4 (64x64, 7x7 windows -> 10x10)
SHAPES = {"stage2": (8 * 19 * 19, 7), "stage3": (8 * 5 * 5, 14), "stage4": (8 * 10 * 10, 7)}
LAYERS = {"stage2": 2, "stage3": 6, "stage4": 2}  # attention blocks per stage


def time_ms(fn, reps=30):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def step_fn(aam, impl, tokens, bf16, compiled):
    run = getattr(aam, impl)
    if compiled:
        run = torch.compile(run, dynamic=False)

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            out = run(tokens)
        out.float().square().mean().backward()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/aam_speed.json")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    rows = []
    for impl in ("reference", "forward"):
        for bf16 in (True, False):
            for compiled in ((False, True) if bf16 else (False,)):  # compiled: as training runs it, bf16
                total, first = 0.0, 0.0
                for stage, (windows, side) in SHAPES.items():
                    aam = atrous_lora.AtrousAttention(4, (1, 2, 3), side=side, device="cuda")
                    tokens = torch.randn(windows, side * side, 8, device="cuda", requires_grad=True)
                    step = step_fn(aam, impl, tokens, bf16, compiled)
                    start = time.perf_counter()
                    step()  # compilation, cuDNN autotuning
                    torch.cuda.synchronize()
                    first += time.perf_counter() - start
                    time_ms(step, 3)
                    ms = time_ms(step)
                    total += ms * LAYERS[stage]
                    rows.append(dict(impl=impl, bf16=bf16, compiled=compiled, stage=stage, ms=ms))
                rows.append(dict(impl=impl, bf16=bf16, compiled=compiled, stage="all", ms=total, first_s=first))
                print(f"{impl:9} {'bf16' if bf16 else 'fp32'} {'compiled' if compiled else 'eager   '} "
                      f"{total:6.2f} ms per batch of 8 (10 blocks, fwd+bwd); first calls {first:.1f} s", flush=True)
    # where reference()'s time goes, on stage 3 (the six 14x14-window blocks)
    windows, side = SHAPES["stage3"]
    aam = atrous_lora.AtrousAttention(4, (1, 2, 3), side=side, device="cuda")
    tokens = torch.randn(windows, side * side, 8, device="cuda", requires_grad=True)
    step = step_fn(aam, "reference", tokens, True, False)
    time_ms(step, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        time_ms(step, 10)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()

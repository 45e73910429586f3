"""Time the Atrous Attention Module alone, forward + backward under bf16 autocast, on the bottleneck shapes
MobileSAM's TinyViT hands it at 1024 and batch 8: reference() (branch by branch, eight convs) and compute()
(the spatial branches as one conv, the pooled branch as a bias), each eager and replayed from CUDA graphs
(atrous_lora.py now replays its whole training step from one: common.TrainStep); then a profile of eager reference() (where the time goes: CPU or GPU).
Writes a JSON; needs a CUDA GPU.

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


class AAMStep(torch.nn.Module):
    """One of the module's computations as a module of its own, for torch.cuda.make_graphed_callables
    (which replaces the forward of the module it is given and returns gradients for its parameters)."""

    def __init__(self, aam, impl):
        super().__init__()
        self.aam, self.impl = aam, impl

    def forward(self, tokens):
        return getattr(self.aam, self.impl)(tokens)


def step_fn(aam, impl, tokens, graphed):
    if graphed:  # capture under autocast with its cast cache off (cached weight casts would go stale)
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            run = torch.cuda.make_graphed_callables(AAMStep(aam, impl), (tokens.detach().clone().requires_grad_(),))
    else:
        run = getattr(aam, impl)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            out = run(tokens)
        out.float().square().mean().backward()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/aam_speed.json")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True  # as common.pick_device on CUDA
    rows = []
    for impl in ("reference", "compute"):
        for graphed in (False, True):
            total = 0.0
            for stage, (windows, side) in SHAPES.items():
                aam = atrous_lora.AtrousAttention(4, (1, 2, 3), side=side, device="cuda")
                tokens = torch.randn(windows, side * side, 8, device="cuda", requires_grad=True)
                step = step_fn(aam, impl, tokens, graphed)
                time_ms(step, 5)  # cuDNN autotuning, warm-up
                ms = time_ms(step)
                total += ms * LAYERS[stage]
                rows.append(dict(impl=impl, graphed=graphed, stage=stage, ms=ms))
            rows.append(dict(impl=impl, graphed=graphed, stage="all", ms=total))
            print(f"{impl:9} {'CUDA graphs' if graphed else 'eager      '} {total:6.2f} ms per batch of 8 "
                  f"(10 blocks, fwd+bwd)", flush=True)
    # where eager reference()'s time goes, on stage 3 (the six 14x14-window blocks)
    windows, side = SHAPES["stage3"]
    aam = atrous_lora.AtrousAttention(4, (1, 2, 3), side=side, device="cuda")
    step = step_fn(aam, "reference", torch.randn(windows, side * side, 8, device="cuda", requires_grad=True), False)
    time_ms(step, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        time_ms(step, 10)
    averages = prof.key_averages()
    cpu_ms = sum(e.self_cpu_time_total for e in averages) / 1e4  # us over 10 steps -> ms per step
    gpu_ms = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1e4
    print(f"eager reference, one stage-3 block: {cpu_ms:.2f} ms of CPU, {gpu_ms:.2f} ms of GPU per fwd+bwd")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows,
                                              profile=dict(cpu_ms=cpu_ms, gpu_ms=gpu_ms)), indent=1))


if __name__ == "__main__":
    main()

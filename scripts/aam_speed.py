"""Time the Atrous Attention Module alone, forward + backward under bf16 autocast, on the bottleneck shapes
MobileSAM's TinyViT hands it at 1024 and batch 8: reference() (branch by branch, eight cuDNN convs) against forward()
(im2col and matrix products), with cuDNN's algorithm search off and on. Writes a JSON; needs a CUDA GPU.

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


def time_ms(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/aam_speed.json")
    args = p.parse_args()
    rows = []
    for cudnn_benchmark in (False, True):
        torch.backends.cudnn.benchmark = cudnn_benchmark
        for impl in ("reference", "forward"):
            total = 0.0
            for stage, (windows, side) in SHAPES.items():
                aam = atrous_lora.AtrousAttention(4, (1, 2, 3), side=side, device="cuda")
                tokens = torch.randn(windows, side * side, 8, device="cuda", requires_grad=True)
                run = getattr(aam, impl)

                def step():
                    with torch.autocast("cuda", torch.bfloat16):
                        out = run(tokens)
                    out.float().square().mean().backward()
                ms = time_ms(step)
                total += ms * LAYERS[stage]
                rows.append(dict(cudnn_benchmark=cudnn_benchmark, impl=impl, stage=stage, ms=ms))
            rows.append(dict(cudnn_benchmark=cudnn_benchmark, impl=impl, stage="all 10 blocks", ms=total))
            print(f"cudnn.benchmark={cudnn_benchmark!s:5} {impl:9}  {total:.2f} ms per batch of 8 (10 blocks, fwd+bwd)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()

"""Registers, spills and shared memory of relpos_attention.py's kernels, compiled for a Hopper GPU (sm_90) on
any machine, no GPU needed (Triton compiles ahead and its bundled cuobjdump reads the binary):

    python scripts/kernel_registers.py

Why: Nsight Compute found the global blocks' kernels latency-bound with two programs of 4 warps per SM, for
want of registers (call cv, results/h200/ncu_global_attention_cv.txt). Three programs of 4 warps fit an SM
at 168 registers per thread or fewer and about 75 KB of shared memory each; spills ("stack") cost time (the
backward kernels capped at 168 spilled and ran slower, call cw). The counts depend on Triton's version: with
the GPU machine's (3.6 on the lent H200), they are the ones Nsight Compute read there (197, 238 and 214 for
the forward, query-side and key-side kernels at call cv's settings), and Triton 3.8 gives others (178 for
that forward). To match a machine, install its Triton beside this environment's:

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python scripts/kernel_registers.py            # the settings below
    PYTHONPATH=/tmp/triton36 python scripts/kernel_registers.py --sweep    # launch settings of every kernel

Then time the candidates on the GPU (scripts/ncu_global_attention.py)."""
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import relpos_attention as ra  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# pointer arguments' element types, as common.fast_vit_attention passes them under bf16 autocast
POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", DO="*bf16", DQ="*bf16", DK="*bf16", DV="*bf16",
                RH="*bf16", RW="*bf16", DRH="*bf16", DRW="*bf16", PAD="*bf16", TH="*fp32", TW="*fp32",
                LSE="*fp32", DELTA="*fp32", DPAD="*fp32")


def usage(kernel, constexprs, num_warps, num_stages, maxnreg=None):
    """dict(regs, stack, smem_kb) of `kernel` compiled for sm_90 with these constexprs and launch options;
    pointers and strides taken as 16-aligned, as the launches at ViT-B's shapes pass them."""
    params = list(inspect.signature(kernel.fn).parameters)
    signature, attrs = {}, {}
    for i, name in enumerate(params):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name], attrs[(i,)] = POINTERS[name], [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:  # strides (s*) and heads
            signature[name] = "i32"
            if name.startswith("s"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(params.index(k),): v for k, v in constexprs.items()})
    options = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    compiled = triton.compile(source, target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", report, re.S)
    return dict(regs=int(found[1]), stack=int(found[2]), smem_kb=round(compiled.metadata.shared / 1024, 1))


ROW = dict(N=4096, ROWS=64, COLS=64, D=64, PRECISION="tf32")  # a ViT-B global block at 1024
WINDOW = dict(N=196, ROWS=14, COLS=14, HP=16, WP=16, D=64, GH=64, GW=64, NWX=5, NWIN=25, HAS_PAD=True,
              PRECISION="tf32")  # ViT-B's 14 x 14 windows over the 64 x 64 grid
# (name, kernel, constexprs, warps, stages, maxnreg): the committed settings first, then candidates
SETTINGS = [
    ("forward (committed: capped)", ra._forward, dict(ROW, RP=64, BLOCK_M=64), 4, 3, 168),
    ("forward uncapped, 4 stages", ra._forward, dict(ROW, RP=64, BLOCK_M=64), 4, 4, None),
    ("dq (committed)", ra._backward_dq, dict(ROW, RP=64, BLOCK_M=64), 4, 4, None),
    ("dq capped 168, 3 stages", ra._backward_dq, dict(ROW, RP=64, BLOCK_M=64), 4, 3, 168),
    ("dkdv (committed)", ra._backward_dkdv, dict(ROW, BLOCK_M=64, BLOCK_N=64, ROWS_PER=1), 4, 3, None),
    ("dkdv capped 168, 2 stages", ra._backward_dkdv, dict(ROW, BLOCK_M=64, BLOCK_N=64, ROWS_PER=1), 4, 2, 168),
    ("dq queries by 32", ra._backward_dq, dict(ROW, RP=64, BLOCK_M=32), 4, 3, None),
    ("dkdv queries by 32", ra._backward_dkdv, dict(ROW, BLOCK_M=32, BLOCK_N=64, ROWS_PER=1), 4, 3, None),
    ("window forward (committed)", ra._window_forward, dict(WINDOW, BLOCK_M=128, BLOCK_N=64), 8, 2, None),
    ("window forward, queries by 64, 4 warps", ra._window_forward, dict(WINDOW, BLOCK_M=64, BLOCK_N=64), 4, 3, None),
    ("window backward (committed)", ra._window_backward_dq,
     dict(WINDOW, BLOCK_M=256, BLOCK_N=64, WHOLE=True, PAD_GRAD=False), 8, 2, None),
    ("window backward, keys by 32", ra._window_backward_dq,
     dict(WINDOW, BLOCK_M=256, BLOCK_N=32, WHOLE=True, PAD_GRAD=False), 8, 2, None),
]


def warps_per_sm(found, num_warps):
    """Warps resident per Hopper SM for a kernel of found = usage(...): programs limited by registers (65,536 per
    SM, allocated per warp in units of 256), shared memory (228 KB per SM, 1 KB of it reserved per program) and
    64 warps."""
    per_warp = -(-found["regs"] * 32 // 256) * 256
    programs = min(65536 // (per_warp * num_warps), int(228 // (found["smem_kb"] + 1)), 64 // num_warps)
    return programs * num_warps


def sweep():
    """(kernel, constexprs, warps, stages) over launch settings of the five kernels ViT-B at 1024 runs."""
    for kernel, shape, blocks in ((ra._forward, dict(ROW, RP=64), [dict(BLOCK_M=m) for m in (32, 64)]),
                                  (ra._backward_dq, dict(ROW, RP=64), [dict(BLOCK_M=m) for m in (32, 64)]),
                                  (ra._backward_dkdv, dict(ROW, BLOCK_N=64, ROWS_PER=1),
                                   [dict(BLOCK_M=m) for m in (32, 64)])):
        for block in blocks:
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    yield kernel, dict(shape, **block), warps, stages
    for m in (32, 64, 128):
        for n in (32, 64):
            for warps in (4, 8):
                for stages in (2, 3):
                    yield ra._window_forward, dict(WINDOW, BLOCK_M=m, BLOCK_N=n), warps, stages
    for n in (16, 32, 64):
        for stages in (1, 2):
            yield ra._window_backward_dq, dict(WINDOW, BLOCK_M=256, BLOCK_N=n, WHOLE=True, PAD_GRAD=False), 8, stages


if __name__ == "__main__":
    if "--sweep" in sys.argv:  # every setting of sweep(), with the warps per SM it leaves room for (a few minutes)
        for kernel, constexprs, warps, stages in sweep():
            blocks = {k: v for k, v in constexprs.items() if k in ("BLOCK_M", "BLOCK_N")}
            try:
                found = usage(kernel, constexprs, warps, stages)
                print(kernel.fn.__name__, blocks, f"{warps} warps, {stages} stages:", found,
                      "warps per SM:", warps_per_sm(found, warps), flush=True)
            except Exception as e:  # a setting the compiler refuses (shared memory, say)
                print(kernel.fn.__name__, blocks, f"{warps} warps, {stages} stages:", type(e).__name__, flush=True)
        sys.exit()
    for name, kernel, constexprs, warps, stages, maxnreg in SETTINGS:
        found = usage(kernel, constexprs, warps, stages, maxnreg)
        print(f"{name:42s} {warps} warps, {stages} stages:", found, "warps per SM:", warps_per_sm(found, warps),
              flush=True)

"""What bounds the global blocks' attention kernels: one ViT-B global block's attention at 1024 (batch 8, 12
heads, 64 x 64 tokens, bf16), forward and backward through relpos_attention.py's row kernels, run twice so
that a profiler can skip the first run's compilation:

    ncu --launch-skip 3 --launch-count 3 --section SpeedOfLight --section Occupancy \
        --section MemoryWorkloadAnalysis python scripts/ncu_global_attention.py

profiles the second run's _forward, _backward_dq and _backward_dkdv (no other kernels launch in between:
the inputs are made before the first run and the output's gradient is a fixed tensor). Alone (no
profiler) it prints the kernels' time per run; with --maxnreg, that of launch settings that cap the registers
per thread (calls cw-cy; --windows: the window kernels on ViT-B's windowed blocks instead; --next: the
settings scripts/kernel_registers.py found to fit three programs per SM). Needs a CUDA GPU that Triton
supports."""
import sys
import time

import torch

sys.path.insert(0, ".")
import relpos_attention  # noqa: E402

B, heads, side, D = 8, 12, 64, 64
g = torch.Generator(device="cuda").manual_seed(0)
qkv = torch.randn(B, side * side, 3, heads, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
table_h = torch.randn(2 * side - 1, D, device="cuda", generator=g) * 0.5
table_w = torch.randn(2 * side - 1, D, device="cuda", generator=g) * 0.5
grad = torch.randn(B, side * side, heads, D, device="cuda", generator=g, dtype=torch.bfloat16)


WINDOWS = "--windows" in sys.argv  # ViT-B's windowed blocks instead: 14 x 14 windows over the 64 x 64 grid
if WINDOWS:
    table_h, table_w = table_h[:27], table_w[:27]
    pad_kv = torch.randn(2, heads, D, device="cuda", generator=g, dtype=torch.bfloat16)


def attention(x):
    if WINDOWS:
        return relpos_attention.window_attention(x, table_h, table_w, D ** -0.5, (side, side), pad_kv)
    return relpos_attention.relpos_attention(x, table_h, table_w, D ** -0.5)


def run():
    out = attention(qkv)
    (d_qkv,) = torch.autograd.grad(out, qkv, grad)
    return d_qkv


def timed(reps=20):
    """ms per run of the forward alone, and of forward and backward."""
    for _ in range(2):
        run()
    times = []
    for fn in (lambda: attention(qkv.detach()), run):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        times.append(round((time.perf_counter() - start) / reps * 1e3, 3))
    return times


if "--maxnreg" not in sys.argv:
    print("global block attention, forward; forward and backward (ms):", timed())
else:
    # launch settings with a register cap per thread (maxnreg), so that more programs fit an SM (call cv's Nsight
    # Compute: 197-238 registers, two programs of 4 warps per SM, 12.5% occupancy), each row after the committed
    # settings; the pipeline stages lowered where shared memory would then be the limit. Calls cw and cx ran
    # these before the forward's cap was committed: their "committed" row is the uncapped forward (4 stages);
    # run today, the fwd168 row repeats the committed settings.
    base = {k: dict(v) for k, v in relpos_attention.CONFIG.items()}
    variants = dict(committed={}, fwd168=dict(forward=dict(maxnreg=168)),
                    fwd128_s3=dict(forward=dict(maxnreg=128, num_stages=3)),
                    dq168_s3=dict(dq=dict(maxnreg=168, num_stages=3)),
                    dkdv168_s2=dict(dkdv=dict(maxnreg=168, num_stages=2)))
    if WINDOWS:
        variants = dict(committed={}, wf128=dict(window_forward=dict(maxnreg=128)),
                        wb128=dict(window_backward=dict(maxnreg=128)))
    if "--next" in sys.argv and WINDOWS:  # settings that fit more programs per SM (scripts/kernel_registers.py)
        variants = dict(committed={},
                        wf_m64_w4_s2=dict(window_forward=dict(BLOCK_M=64, num_warps=4, num_stages=2)),
                        wf_m64_w4_s3=dict(window_forward=dict(BLOCK_M=64, num_warps=4, num_stages=3)),
                        wb_n32=dict(window_backward=dict(BLOCK_N=32)))
    elif "--next" in sys.argv:
        variants = dict(committed={},
                        dkdv_m32_s2=dict(dkdv=dict(BLOCK_M=32, num_stages=2)),
                        dkdv_m32_s3=dict(dkdv=dict(BLOCK_M=32, num_stages=3)),
                        dkdv_m32_s4=dict(dkdv=dict(BLOCK_M=32, num_stages=4)),
                        dq_m32_s3=dict(dq=dict(BLOCK_M=32, num_stages=3)),
                        dq_m32_s4=dict(dq=dict(BLOCK_M=32, num_stages=4)),
                        dq_m32_dkdv_m32=dict(dq=dict(BLOCK_M=32, num_stages=3), dkdv=dict(BLOCK_M=32, num_stages=3)))
    if "--forward" in sys.argv:  # the forward's cap and stages around the best of the first sweep (call cx)
        variants = dict(committed={}, fwd168=dict(forward=dict(maxnreg=168)),
                        fwd160=dict(forward=dict(maxnreg=160)), fwd152=dict(forward=dict(maxnreg=152)),
                        fwd168_s3=dict(forward=dict(maxnreg=168, num_stages=3)),
                        fwd144_s3=dict(forward=dict(maxnreg=144, num_stages=3)))
    reference = None
    for name, change in variants.items():
        relpos_attention.CONFIG.clear()
        relpos_attention.CONFIG.update({k: dict(v, **change.get(k, {})) for k, v in base.items()})
        try:
            d_qkv = run().float()  # the gradient against the committed settings': a setting changes no result
            reference = d_qkv if reference is None else reference
            print(name, timed(), "max |d_qkv - committed's|:", (d_qkv - reference).abs().max().item(), flush=True)
        except Exception as e:  # a setting the compiler refuses
            print(name, type(e).__name__, str(e)[:200], flush=True)

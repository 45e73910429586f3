# Speed issue: compile time of ViT-B LoRA on cold caches with inductor's defaults and without autotuning of
# pointwise kernels, then on the warm cache of the first (a second run on the same machine).
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
B="python3 benchmarks/bench.py --models vit_b --methods lora --batches 8 --configs fast_bf16_compile_graph --no-flops"
TORCHINDUCTOR_CACHE_DIR=/tmp/cache_a timeout 170 $B --out /tmp/runs/compile_cold > /tmp/runs/compile_cold.log 2>&1
TORCHINDUCTOR_CACHE_DIR=/tmp/cache_b timeout 170 $B --inductor triton.autotune_pointwise=False --out /tmp/runs/compile_cold_noautotune > /tmp/runs/compile_cold_noautotune.log 2>&1
TORCHINDUCTOR_CACHE_DIR=/tmp/cache_a timeout 120 $B --out /tmp/runs/compile_warm > /tmp/runs/compile_warm.log 2>&1
for f in compile_cold compile_cold_noautotune compile_warm; do echo $f; tail -n 1 /tmp/runs/$f/bench.md | cut -d'|' -f2-11; done
tar czf $OUT/runs.tgz -C /tmp runs

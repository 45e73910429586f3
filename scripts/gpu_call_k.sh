# Speed issue, final figures (3/3): ViT-B rows of the other methods, each beside its own stock baseline.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
timeout 560 python3 benchmarks/bench.py --models vit_b --methods atrous_lora,salt,balr_sam,samora --batches 8 \
  --configs fast_bf16_compile_graph,stock_bf16 --max-seconds 480 --out /tmp/runs/bench_vit_b_methods > /tmp/runs/bench_vit_b_methods.log 2>&1
tail -n 8 /tmp/runs/bench_vit_b_methods/bench.md | cut -d'|' -f2-13
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

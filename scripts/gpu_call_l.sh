# Speed issue, final figures (4/4): every method on MobileSAM against stock attention (again: the rows of
# gpu_call_j.sh ran with in-place q/v adds, since reverted), and ViT-B SAMora beside its stock baseline.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
timeout 250 python3 benchmarks/bench.py --models mobile_sam --methods lora,atrous_lora,salt,balr_sam,samora --batches 8 \
  --configs stock_bf16,fast_bf16_graph --out /tmp/runs/bench_mobile_sam > /tmp/runs/bench_mobile_sam.log 2>&1
tail -n 10 /tmp/runs/bench_mobile_sam/bench.md | cut -d'|' -f2-13
timeout 200 python3 benchmarks/bench.py --models vit_b --methods samora --batches 8 \
  --configs fast_bf16_compile_graph,stock_bf16 --out /tmp/runs/bench_vit_b_samora > /tmp/runs/bench_vit_b_samora.log 2>&1
tail -n 2 /tmp/runs/bench_vit_b_samora/bench.md | cut -d'|' -f2-13
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

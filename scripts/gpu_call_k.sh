# Speed issue, final figures (3/3): the default lora run end to end twice, MobileSAM LoRA alone, then ViT-B rows of
# the other methods, each beside its own stock baseline, while time is left.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
for i in 1 2; do
  ( time timeout 150 python3 lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_lora_$i ) 2>&1 \
    | tr '\r' '\n' > /tmp/runs/solo_lora_$i.log
  grep -E "^test|^real" /tmp/runs/solo_lora_$i.log
done
timeout 60 python3 benchmarks/bench.py --models mobile_sam --methods lora --batches 1,4,8 --configs fast_bf16_graph \
  --out /tmp/runs/bench_mobile_sam_lora > /tmp/runs/bench_mobile_sam_lora.log 2>&1
tail -n 3 /tmp/runs/bench_mobile_sam_lora/bench.md | cut -d'|' -f2-13
timeout 400 python3 benchmarks/bench.py --models vit_b --methods atrous_lora,salt,balr_sam,samora --batches 8 \
  --configs fast_bf16_compile_graph,stock_bf16 --max-seconds 300 --out /tmp/runs/bench_vit_b_methods > /tmp/runs/bench_vit_b_methods.log 2>&1
tail -n 8 /tmp/runs/bench_vit_b_methods/bench.md | cut -d'|' -f2-13
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

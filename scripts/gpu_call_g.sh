# Speed issue, step graphs: a solo default lora run (end to end), ViT-B LoRA configs with the whole step as a
# CUDA graph, every MobileSAM method with and without it. Results come back in $OUT.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
( time timeout 150 python3 lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_lora ) 2>&1 \
  | tr '\r' '\n' > /tmp/runs/solo_lora.log
grep -E "^eval|^test|^real|before" /tmp/runs/solo_lora.log
B="python3 benchmarks/bench.py --no-flops --no-inference --batches 8 --windows 3 --steps 5"
PROBE_SKIP_DECODER=1 PROBE_SKIP_BLOCK0=1 timeout 150 $B --models vit_b --configs fast_bf16_compile_graph --out /tmp/runs/b1 > /tmp/runs/b1.log 2>&1
timeout 60 $B --models vit_b --configs fast_bf16_graph --out /tmp/runs/b2 > /tmp/runs/b2.log 2>&1
PROBE_SKIP_DECODER=1 PROBE_SKIP_BLOCK0=1 timeout 100 $B --models vit_b --configs fast_bf16_compile_ckpt_graph --out /tmp/runs/b3 > /tmp/runs/b3.log 2>&1
timeout 150 $B --models mobile_sam --methods lora,atrous_lora,salt,balr_sam,samora --configs fast_bf16,fast_bf16_graph --out /tmp/runs/b4 > /tmp/runs/b4.log 2>&1
for f in b1 b2 b3 b4; do tail -n +4 /tmp/runs/$f/bench.md | cut -d'|' -f2-9; grep -E "Error|error" /tmp/runs/$f.log | head -3; done
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

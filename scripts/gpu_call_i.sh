# Speed issue, final figures (1/2): the default lora run end to end twice (the first on a fresh machine also
# writes Python's bytecode caches), the GPU tests of the fast path, ViT-B LoRA rows on cold compile caches.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
for i in 1 2; do
  ( time timeout 150 python3 lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_lora_$i ) 2>&1 \
    | tr '\r' '\n' > /tmp/runs/solo_lora_$i.log
  grep -E "^test|^real" /tmp/runs/solo_lora_$i.log
done
timeout 120 python3 -m pytest -q tests/test_fastpath.py 2>&1 | tail -2
timeout 330 python3 benchmarks/bench.py --models vit_b --methods lora --batches 8 \
  --configs fast_bf16_compile_graph,fast_bf16_compile_ckpt_graph,stock_bf16 --out /tmp/runs/bench_vit_b_lora > /tmp/runs/bench_vit_b_lora.log 2>&1
tail -n 4 /tmp/runs/bench_vit_b_lora/bench.md | cut -d'|' -f2-13
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

# Speed issue, final figures (2/3): GPU tests of the fast path, the default lora run end to end twice (the first
# on a fresh machine also writes Python's bytecode caches), every method on MobileSAM against stock attention.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
timeout 120 python3 -m pytest -q tests/test_fastpath.py > /tmp/runs/pytest_gpu.log 2>&1; tail -2 /tmp/runs/pytest_gpu.log
for i in 1 2; do
  ( time timeout 150 python3 lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_lora_$i ) 2>&1 \
    | tr '\r' '\n' > /tmp/runs/solo_lora_$i.log
  grep -E "^test|^real" /tmp/runs/solo_lora_$i.log
done
timeout 250 python3 benchmarks/bench.py --models mobile_sam --methods lora,atrous_lora,salt,balr_sam,samora --batches 8 \
  --configs stock_bf16,fast_bf16_graph --out /tmp/runs/bench_mobile_sam > /tmp/runs/bench_mobile_sam.log 2>&1
tail -n 10 /tmp/runs/bench_mobile_sam/bench.md | cut -d'|' -f2-13
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

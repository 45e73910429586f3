# One GPU call: the default lora run alone (its end-to-end time), SAMora on synthetic data (short budget,
# as the other methods' synthetic rows), then the ViT-B speed rows of benchmarks/bench.py.
source scripts/gpu_setup.sh > /dev/null
mkdir -p /tmp/runs
( time timeout 120 python3 lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_lora ) 2>&1 \
  | tr '\r' '\n' | grep -E "^test|^real|img/s" | tail -3
timeout 170 python3 train.py --out /tmp/runs --methods "samora --stage1-steps 100" --data synthetic --seeds 0 1 2 \
  --parallel 3 --results /tmp/runs/results_syn -- --steps 100 > /tmp/runs/train_syn.log 2>&1
for f in /tmp/runs/samora*_s?.log; do tr '\r' '\n' < $f | grep -E "^test|^error|Error" | tail -1; done
timeout 200 python3 benchmarks/bench.py --models vit_b --methods lora --batches 8 --windows 3 --max-seconds 170 \
  --configs stock_bf16,fast_bf16,fast_bf16_compile,fast_bf16_compile_ckpt --out /tmp/runs/bench_vit_b > /tmp/runs/bench_vit_b.log 2>&1
timeout 70 python3 benchmarks/bench.py --models vit_b --methods atrous_lora,salt,balr_sam,samora --batches 8 --windows 3 \
  --max-seconds 50 --configs fast_bf16 --no-flops --append --out /tmp/runs/bench_vit_b >> /tmp/runs/bench_vit_b.log 2>&1
cat /tmp/runs/bench_vit_b/bench.md
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

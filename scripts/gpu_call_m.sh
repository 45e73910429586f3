# Speed issue, final figures: the default lora run end to end (after a process that writes Python's bytecode
# caches), with evaluation eager and with cuDNN autotuning off for comparison; every method on MobileSAM against
# stock attention; ViT-B SAMora beside its stock baseline.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
timeout 120 python3 -m pytest -q tests/test_fastpath.py > /tmp/runs/pytest_gpu.log 2>&1; tail -1 /tmp/runs/pytest_gpu.log
python3 -c "import common, lora, data, matplotlib.pyplot, torch._dynamo" 2>/dev/null
for v in default PEFT_SAM_EAGER_EVAL PEFT_SAM_NO_CUDNN_BENCHMARK; do
  ( time env $v=1 timeout 150 python3 lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_$v ) 2>&1 \
    | tr '\r' '\n' > /tmp/runs/solo_$v.log
  echo $v; grep -E "^test|^real" /tmp/runs/solo_$v.log
done
timeout 200 python3 benchmarks/bench.py --models mobile_sam --methods lora,atrous_lora,salt,balr_sam,samora --batches 8 \
  --configs stock_bf16,fast_bf16_graph --out /tmp/runs/bench_mobile_sam > /tmp/runs/bench_mobile_sam.log 2>&1
tail -n 10 /tmp/runs/bench_mobile_sam/bench.md | cut -d'|' -f2-13
timeout 110 python3 benchmarks/bench.py --models vit_b --methods samora --batches 8 \
  --configs fast_bf16_compile_graph,stock_bf16 --out /tmp/runs/bench_vit_b_samora > /tmp/runs/bench_vit_b_samora.log 2>&1
tail -n 2 /tmp/runs/bench_vit_b_samora/bench.md | cut -d'|' -f2-13
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

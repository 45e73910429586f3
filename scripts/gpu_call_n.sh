# Speed issue: GPU tests, then the default lora run end to end (after a process that writes Python's bytecode
# caches) twice with evaluation replayed from CUDA graphs and once eagerly.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
timeout 120 python3 -m pytest -q tests/test_fastpath.py > /tmp/runs/pytest_gpu.log 2>&1; tail -1 /tmp/runs/pytest_gpu.log
python3 -c "import common, lora, data, matplotlib.pyplot, torch._dynamo" 2>/dev/null
for v in default_1 PEFT_SAM_EAGER_EVAL default_2; do
  ( time env $v=1 timeout 150 python3 lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_$v ) 2>&1 \
    | tr '\r' '\n' > /tmp/runs/solo_$v.log
  echo $v; grep -E "^test|^real|Error" /tmp/runs/solo_$v.log
done
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

# One GPU call within the 10-minute limit: optional speed measurements, an optional solo lora run (its wall
# time), then train.py with the given arguments until the deadline; everything small returns as one tarball.
# usage: BENCH=1 SOLO=1 PRE='command' DEADLINE=560 bash scripts/gpu_call.sh <train.py arguments>
source scripts/gpu_setup.sh
T0=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - T0) )); }
mkdir -p /tmp/runs
if [ -n "${BENCH:-}" ]; then
  timeout 150 python3 benchmarks/bench.py --models mobile_sam --methods lora,atrous_lora,salt,balr_sam \
    --configs stock_bf16,fast_bf16 --batches 8 --no-flops --windows 3 --out /tmp/runs/bench_ms > /tmp/runs/bench_ms.log 2>&1
  tail -12 /tmp/runs/bench_ms/bench.md
  timeout 60 python3 balr_sam.py --measure-decoder --out /tmp/runs --run-name balr_measure > /tmp/runs/balr_measure.log 2>&1
  tail -8 /tmp/runs/balr_measure.log
fi
if [ -n "${PRE:-}" ]; then  # any other measurement first: PRE='python3 scripts/aam_speed.py --out /tmp/runs/aam.json'
  timeout $(left) bash -c "$PRE" > /tmp/runs/pre.log 2>&1
  tail -25 /tmp/runs/pre.log
fi
if [ -n "${SOLO:-}" ]; then
  ( time timeout 240 python3 lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_lora ) 2>&1 \
    | tr '\r' '\n' > /tmp/runs/solo_lora.log
  grep -E "^eval|^test|^real|trainable|zoom" /tmp/runs/solo_lora.log
fi
[ $# -gt 0 ] && timeout $(left) python3 train.py --out /tmp/runs "$@" > /tmp/runs/train.log 2>&1
for f in /tmp/runs/*_s?.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "^test|^error|Error|^eval" | tail -2; done
cp results.md /tmp/runs/ 2>/dev/null
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

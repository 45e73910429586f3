# Runs several trainings at once on one GPU (MobileSAM leaves most of an H100 idle), each logging to $OUT.
# usage: bash scripts/sweep.sh NAME "ARGS" NAME "ARGS" ...
source scripts/gpu_setup.sh
while [ $# -gt 0 ]; do
  name=$1; shift; a=$1; shift
  (python3 ${SCRIPT:-lora.py} --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name $name $a 2>&1 | tr '\r' '\n' > $OUT/$name.log; cp /tmp/runs/$name/metrics.json $OUT/$name.json 2>/dev/null) &
done
wait
for f in $OUT/*.log; do echo "== $f"; grep -E "^test|error" $f; done

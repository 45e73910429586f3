# One GPU call, three jobs at once: SAMora against LoRA with 30% of the labels (the lora runs came from an
# earlier call), all methods on synthetic data at a short budget, and export -> stock MobileSAM on DRIVE.
source scripts/gpu_setup.sh > /dev/null
mkdir -p /tmp/runs
(timeout 500 python3 train.py --out /tmp/runs --methods "samora --label-fraction 0.3" --data drive --data-root $DRIVE \
   --seeds 0 1 2 --parallel 3 --results /tmp/runs/results_lf > /tmp/runs/train_lf.log 2>&1) &
(timeout 480 python3 train.py --out /tmp/runs --methods lora atrous_lora "salt --rank 4" "salt --rank 256" balr_sam \
   "samora --stage1-steps 100" --data synthetic --seeds 0 1 2 --parallel 3 --results /tmp/runs/results_syn \
   -- --steps 100 > /tmp/runs/train_syn.log 2>&1) &
(timeout 200 python3 lora.py --data drive --data-root $DRIVE --steps 300 --out /tmp/runs --run-name export_lora \
   > /tmp/runs/export_lora.log 2>&1 && timeout 200 python3 scripts/check_export.py /tmp/runs/export_lora/last.pt $DRIVE \
   /tmp/runs/check_export.json > /tmp/runs/check_export.log 2>&1) &
wait
tail -3 /tmp/runs/check_export.log
for f in /tmp/runs/*_s?.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "^test|^error|Error" | tail -1; done
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

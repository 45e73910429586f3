# The README's results tables and figures, by one command:  bash scripts/results.sh DRIVE_ROOT [JSRT_ROOT]
# Runs whatever is missing under RUNS (default results/runs; train.py skips a run whose metrics.json exists):
# the U-Net baseline and seven method configurations x three seeds on DRIVE with MobileSAM, about a minute of an
# H200 each, then writes results/drive.md (the table), results/drive.png (Dice against trainable parameters)
# and, where the runs' test masks are there, results/drive_panel.png. With JSRT_ROOT (the JSRT chest X-rays:
# images/, masks/ with classes 1-5, test.txt) the same for the U-Net and the five methods on its five classes
# (each also at rank 4, SALT with the paper's regulariser weight; SAMora also with its released stage-2
# learning rate and weight decay), under RUNS/jsrt, into results/jsrt.md and results/jsrt.png, with Dice per
# class.
# REPORT_ONLY=1 rebuilds the tables and figures from RUNS alone (the committed metrics.json files).
# RESULTS=DIR writes them into DIR instead of results/; PYTHON names the interpreter (default: python);
# PARALLEL=N runs N at a time on one GPU (default 1).
set -e
DRIVE=${1:?usage: bash scripts/results.sh DRIVE_ROOT [JSRT_ROOT]}
RUNS=${RUNS:-results/runs}
"${PYTHON:-python}" train.py ${REPORT_ONLY:+--report-only} --out "$RUNS" --data drive --data-root "$DRIVE" --seeds 0 1 2 \
  --parallel "${PARALLEL:-1}" --results "${RESULTS:-results}/drive" \
  --methods unet lora atrous_lora "salt --rank 4" "salt --rank 4 --reg-weight 0.01" "salt --rank 256 --reg-weight 0.01" \
  balr_sam "samora --stage both"
if [ -n "$2" ]; then
  "${PYTHON:-python}" train.py ${REPORT_ONLY:+--report-only} --out "$RUNS/jsrt" --data folder --data-root "$2" \
    --seeds 0 1 2 --parallel "${PARALLEL:-1}" --results "${RESULTS:-results}/jsrt" \
    --class-names "right lung" "left lung" heart "right clavicle" "left clavicle" \
    --methods unet lora "lora --rank 4" atrous_lora "atrous_lora --rank 4" salt "salt --rank 4 --reg-weight 0.01" \
    balr_sam "balr_sam --rank 4" "samora --stage both" "samora --stage both --rank 4" \
    "samora --stage both --lr 5e-3 --weight-decay 0.1 --steps 1500" -- --num-classes 5
fi

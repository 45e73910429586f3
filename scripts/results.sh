# The README's results table and figures, by one command:  bash scripts/results.sh DRIVE_ROOT
# Runs whatever is missing under RUNS (default results/runs; train.py skips a run whose metrics.json exists):
# six method configurations x three seeds on DRIVE with MobileSAM, about a minute of an H200 each. Then writes
# results/drive.md (the table), results/drive.png (Dice against trainable parameters) and, where the runs'
# test masks are there, results/drive_panel.png.
# REPORT_ONLY=1 rebuilds the table and figures from RUNS alone (the committed metrics.json files).
# RESULTS=DIR writes them into DIR instead of results/; PYTHON names the interpreter (default: python);
# PARALLEL=N runs N at a time on one GPU (default 1).
set -e
DRIVE=${1:?usage: bash scripts/results.sh DRIVE_ROOT}
RUNS=${RUNS:-results/runs}
"${PYTHON:-python}" train.py ${REPORT_ONLY:+--report-only} --out "$RUNS" --data drive --data-root "$DRIVE" --seeds 0 1 2 \
  --parallel "${PARALLEL:-1}" --results "${RESULTS:-results}/drive" \
  --methods lora atrous_lora "salt --rank 4" "salt --rank 256" balr_sam "samora --stage both"

# Every result table and figure of the README, by one command:  bash scripts/results.sh DRIVE_ROOT [RUNS]
# On a GPU it runs whatever is missing from RUNS (train.py skips runs whose metrics.json exists; about
# 40 minutes of an H100 for all of them), then writes results/drive.md|.png|_panel.png (six methods, three
# seeds), results/few_labels.md|.png (SAMora against LoRA on 4 labelled images) and
# results/synthetic.md|.png (a short 100-step budget on the generated vessels).
# REPORT_ONLY=1 rebuilds the tables and figures from RUNS alone (default: results/h100/runs, where the H100
# runs that the README quotes were written; their metrics.json files were not committed, see the README's
# Results, so a clean clone has none there and the command says so).
# RESULTS=DIR writes the tables and figures into DIR instead of results/ (the H200 rerun's: RESULTS=results/h200).
# PYTHON names the interpreter that runs train.py (default: python, as in the README's environment).
# PARALLEL=N runs N at a time (default 1, so that each run's "train s" is its own and each run's metrics are
# written as it ends; the H100 runs went six at a time, three on the synthetic data).
set -e
DRIVE=${1:?usage: bash scripts/results.sh DRIVE_ROOT [RUNS]}
RUNS=${2:-results/h100/runs}
ONLY=${REPORT_ONLY:+--report-only}
TABLES=${RESULTS:-results}
PYTHON=${PYTHON:-python}
"$PYTHON" train.py $ONLY --out "$RUNS" --data drive --data-root "$DRIVE" --seeds 0 1 2 --parallel ${PARALLEL:-1} --results "$TABLES/drive" \
  --methods lora atrous_lora "salt --rank 4" "salt --rank 256" balr_sam "samora --stage both"
"$PYTHON" train.py $ONLY --out "$RUNS" --data drive --data-root "$DRIVE" --seeds 0 1 2 --parallel ${PARALLEL:-1} --results "$TABLES/few_labels" \
  --methods "lora --label-fraction 0.3" "samora --label-fraction 0.3"
"$PYTHON" train.py $ONLY --out "$RUNS" --data synthetic --seeds 0 1 2 --parallel ${PARALLEL:-1} --results "$TABLES/synthetic" \
  --methods lora atrous_lora "salt --rank 4" "salt --rank 256" balr_sam "samora --stage1-steps 100" -- --steps 100

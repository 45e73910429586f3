# Speed issue: where a default lora run's wall time goes (cProfile), and a full kernel profile of the compiled
# ViT-B LoRA step.
source scripts/gpu_setup.sh
mkdir -p /tmp/runs
timeout 150 python3 -m cProfile -o /tmp/runs/solo.prof lora.py --data drive --data-root $DRIVE --split salt --out /tmp/runs --run-name solo_lora 2>&1 | tr '\r' '\n' > /tmp/runs/solo_lora.log
python3 -c "
import pstats; p = pstats.Stats('/tmp/runs/solo.prof'); p.sort_stats('cumulative').print_stats(45)" > /tmp/runs/solo_prof.txt 2>&1
head -80 /tmp/runs/solo_prof.txt | cut -c1-150
PROBE_SKIP_DECODER=1 PROBE_SKIP_BLOCK0=1 timeout 200 python3 scripts/speed_probe.py vitb --out /tmp/runs/vitb > /tmp/runs/vitb.log 2>&1
grep "^vitb" /tmp/runs/vitb.log
tar czf $OUT/runs.tgz --exclude='*.pt' -C /tmp runs

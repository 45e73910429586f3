"""Run a method script with timestamps (seconds since this wrapper started) printed at the phases that
compile or tear down: common.run's start and end, train_loop's start and end, and at exit before and after
the interpreter's exit handlers (inductor's compile-worker shutdown among them). Used by speed_calls.sh al:
    python scripts/timed_run.py lora.py --model vit_b --checkpoint none --data drive ...
"""
import atexit
import runpy
import sys
import time
from pathlib import Path

T0 = time.time()


def stamp(what):
    print(f"\n[t] {what} {time.time() - T0:.1f} s", flush=True)


atexit.register(stamp, "exit handlers done")  # registered first, so it runs last
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def timed(name, fn, after=None):
    def wrapper(*args, **kwargs):
        stamp(f"{name} start")
        try:
            return fn(*args, **kwargs)
        finally:
            stamp(f"{name} end")
            if after:
                after()
    return wrapper


common.train_loop = timed("train_loop", common.train_loop)
common.run = timed("run", common.run, after=lambda: atexit.register(stamp, "exit handlers start"))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")

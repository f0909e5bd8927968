"""Resume overhead: from the restart of a killed train stage to its first new optimizer step.

Builds a small project in a temp folder (bootstrap, validate, tokenize), starts
`python -m tasks train`, kills it with SIGKILL once checkpoint-K exists, starts
it again and times the restart until the journal shows step K+1. Also times a
cold start (no checkpoint) to step 1, the same way, for comparison.

    .venv/bin/python bench/resume_overhead.py [--steps 60] [--kill-after 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def wait_for(pred, proc: subprocess.Popen, timeout: float = 600) -> float:
    start = time.perf_counter()
    while not pred():
        if proc.poll() is not None:
            raise SystemExit(f"train exited early: {proc.communicate()}")
        if time.perf_counter() - start > timeout:
            raise SystemExit("timed out")
        time.sleep(0.02)
    return time.perf_counter()


def journal_steps(journal: Path) -> list[int]:
    if not journal.exists():
        return []
    return [json.loads(line)["step"] for line in journal.read_text().splitlines() if line.strip()]


def main() -> None:
    import yaml
    from conftest import tiny_params

    from tasks import run_stage
    from tuneline.logs import quiet_libraries

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kill-after", type=int, default=20, help="checkpoint step to kill after")
    args = ap.parse_args()
    quiet_libraries()
    root = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    params = tiny_params(root, train__max_steps=args.steps, train__save_steps=args.kill_after,
                         train__logging_steps=1)
    for name in ("bootstrap", "validate", "tokenize"):
        run_stage(name, params)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    cmd = [sys.executable, "-m", "tasks", "train", "--params", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    journal = params.train.checkpoint_dir / "train_log.jsonl"
    ckpt = params.train.checkpoint_dir / f"checkpoint-{args.kill_after}"

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cold = wait_for(lambda: 1 in journal_steps(journal), proc) - t0
    wait_for(ckpt.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    t1 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    resumed = wait_for(lambda: args.kill_after + 1 in journal_steps(journal), proc) - t1
    proc.wait()
    print(json.dumps({"cold_start_to_step_1_s": round(cold, 2),
                      f"restart_to_step_{args.kill_after + 1}_s": round(resumed, 2),
                      "resume_overhead_s": round(resumed - cold, 2), "exit_code": proc.returncode}))


if __name__ == "__main__":
    main()

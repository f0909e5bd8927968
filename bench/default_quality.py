"""The embedded default's quality over training seeds: base vs candidate, and the gate's margin.

Runs bootstrap, validate and tokenize of params.yaml once (in a temp copy of the paths), then train and
evaluate once per seed, as the pipeline runs them, and prints exact match, ROUGE-L and perplexity of the
base and of each seed's candidate, the worst seed, and how far its figures clear params.yaml's gate.
Appends one JSON object per seed, then a summary, to bench/results/default_quality_cpu.jsonl.

    .venv/bin/python bench/default_quality.py [--seeds 42 43 44]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "default_quality_cpu.jsonl"
METRICS = ("exact_match", "rouge_l", "perplexity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    args = parser.parse_args()

    from tasks import run_stage
    from tuneline.config import load_params
    from tuneline.logs import quiet_libraries

    quiet_libraries()
    root = Path(tempfile.mkdtemp(prefix="tuneline-quality-"))
    paths = [f"reports_dir={root}/reports", f"bootstrap.data_dir={root}/data/raw",
             f"bootstrap.model_dir={root}/models/base", f"model.base={root}/models/base",
             f"data.train_path={root}/data/raw/train.jsonl", f"data.eval_path={root}/data/raw/eval.jsonl",
             f"data.validated_dir={root}/data/validated", f"data.tokenized_dir={root}/data/tokenized",
             f"data.root={root}", f"registry.tracking_uri=sqlite:///{root}/mlflow.db",
             f"registry.artifact_location={root}/mlartifacts", "evaluate.compare_champion=false"]
    params = load_params(REPO / "params.yaml", paths)
    for stage in ("bootstrap", "validate", "tokenize"):
        run_stage(stage, params)

    rows, base = [], None
    for i, seed in enumerate(args.seeds):
        p = load_params(REPO / "params.yaml", [*paths, f"train.seed={seed}", f"evaluate.compare_base={i == 0}",
                                               f"train.output_dir={root}/models/adapter-{seed}"])
        start = time.perf_counter()
        train = run_stage("train", p)
        run_stage("evaluate", p)
        report = json.loads(p.report("eval.json").read_text(encoding="utf-8"))
        base = base or {k: report["base"][k] for k in METRICS}
        rows.append({"seed": seed, "train_s": train["seconds"], "seconds": round(time.perf_counter() - start, 1),
                     **{k: report["candidate"][k] for k in METRICS}})

    gate = params.gate
    worst = min(rows, key=lambda r: r["exact_match"])
    summary = {"summary": True, "seeds": args.seeds, "base": base, "worst_seed": worst["seed"],
               "em_margin": round(worst["exact_match"] - gate.min_exact_match, 4),
               "rouge_l_margin": round(min(r["rouge_l"] for r in rows) - gate.min_rouge_l, 4),
               "em_over_base": round(worst["exact_match"] / base["exact_match"], 1) if base["exact_match"] else None,
               "gate": {"min_exact_match": gate.min_exact_match, "min_rouge_l": gate.min_rouge_l},
               "train": {k: getattr(params.train, k) for k in ("learning_rate", "max_steps", "batch_size")},
               "lora": {"method": params.lora.method, "r": params.lora.r, "alpha": params.lora.alpha},
               "eval_records": params.evaluate.num_samples, "max_new_tokens": params.evaluate.max_new_tokens,
               "date": time.strftime("%Y-%m-%d")}
    print(f"{'model':<16}" + "".join(f"{k:>14}" for k in METRICS))
    print(f"{'base':<16}" + "".join(f"{base[k]:>14.4f}" for k in METRICS))
    for r in rows:
        print(f"{'seed ' + str(r['seed']):<16}" + "".join(f"{r[k]:>14.4f}" for k in METRICS)
              + f"   train {r['train_s']:.0f}s")
    print(f"worst seed {worst['seed']}: exact match {worst['exact_match']:.3f} clears the gate's "
          f"{gate.min_exact_match} by {summary['em_margin']:.3f}; ROUGE-L clears {gate.min_rouge_l} by "
          f"{summary['rouge_l_margin']:.3f}")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in [*rows, summary])


if __name__ == "__main__":
    main()

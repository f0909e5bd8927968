"""Stage 4, evaluate: the candidate against the base model and the serving champion.

For each model: perplexity on the eval split's response tokens (teacher
forcing), then greedy generation on the first `evaluate.num_samples` eval
prompts scored with ROUGE-1/2/L (rouge-score), BLEU (sacrebleu) and exact
match. On preference data (DPO) the chosen answer is the reference, and each
model also gets a win rate (the share of eval pairs whose chosen answer it
gives a higher log-probability than the rejected one) and the mean log-prob
margin of chosen over rejected. Writes reports/eval.json (the DVC metrics
file) and logs a table of sample generations to MLflow.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tuneline import registry, run_view, tracking
from tuneline.atomic import write_json
from tuneline.config import Params
from tuneline.models import load_model, load_tokenizer
from tuneline.scoring import eval_inputs, preference_pairs, prompts_and_references, score_model


def load_candidate(params: Params):
    """Base + adapter, or the fully fine-tuned model for `lora.method: full`."""
    if params.lora.method == "full":
        return load_model(params, path=params.train.output_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(params), str(params.train.output_dir))


def run(params: Params) -> dict:
    import mlflow

    tokenizer = load_tokenizer(params)
    records, examples = eval_inputs(params)
    prompts, references = prompts_and_references(records, params, tokenizer)
    pairs = preference_pairs(records, params, tokenizer) if params.data.format == "preference" else None

    models = {"candidate": load_candidate}
    if params.evaluate.compare_base:
        models["base"] = load_model
    champion = registry.alias_version(params, registry.CHAMPION) if params.evaluate.compare_champion else None

    report: dict = {"num_samples": len(records), "champion_version": champion}
    generations: dict[str, list[str]] = {}
    for name, loader in models.items():
        report[name], generations[name] = score_model(loader(params), tokenizer, params, list(prompts),
                                                      references, examples, pairs)
    if champion is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = registry.fetch(params, champion, Path(tmp))
            report["champion"], generations["champion"] = score_model(
                load_model(params, path=path), load_tokenizer(params, path=path), params,
                list(prompts), references, examples, pairs)
    else:
        report["champion"] = None

    write_json(params.report("eval.json"), report)
    with tracking.pipeline_run(params):
        tracking.log_section_params(params, "evaluate")
        eval_file = params.data.eval_path or params.data.validated_dir / "eval.jsonl"  # none given: the split
        run_view.log_dataset("eval", eval_file)
        mlflow.log_metrics(tracking.numeric({k: v for k, v in report.items() if isinstance(v, dict)}, "eval."))
        mlflow.log_table(data=eval_table(report), artifact_file="eval_table.json")
        keep = min(params.evaluate.samples_logged, len(records))
        table = {"prompt": list(prompts[:keep]), "reference": references[:keep]}
        table.update({name: gens[:keep] for name, gens in generations.items() if gens})
        mlflow.log_table(data=table, artifact_file="eval_samples.json")
        tracking.log_files(params.report("eval.json"))
    _print_table(report)
    cand = report["candidate"]
    return {k: cand[k] for k in ("exact_match", "rouge_l", "perplexity") if k in cand}


def eval_table(report: dict) -> dict[str, list]:
    """The models side by side, one metric per row (MLflow's table view of eval_table.json)."""
    metrics = list(report["candidate"])
    champion = report.get("champion")
    return {"metric": metrics,
            "candidate": [report["candidate"][m] for m in metrics],
            "base": [(report.get("base") or {}).get(m) for m in metrics],
            "champion": [champion.get(m) for m in metrics] if champion else ["no champion yet"] * len(metrics)}


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [name for name in ("candidate", "base", "champion") if report.get(name)]
    table = Table(title=f"evaluation on {report['num_samples']} eval records")
    table.add_column("metric")
    for name in rows:
        table.add_column(name, justify="right")
    for metric in report["candidate"]:
        table.add_row(metric, *(f"{report[name][metric]:.4f}" for name in rows))
    Console(stderr=True).print(table)

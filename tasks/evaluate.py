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

import json
import math
import tempfile
from pathlib import Path

from tasks import registry, tracking
from tasks.atomic import write_json
from tasks.config import Params
from tasks.formats import render, stop_strings, with_rejected_answer
from tasks.models import generate_greedy, load_model, load_tokenizer

METRIC_KEYS = {"perplexity": ["perplexity"], "rouge": ["rouge_1", "rouge_2", "rouge_l"],
               "bleu": ["bleu"], "exact_match": ["exact_match"]}


def cut_at_stops(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def generate(model, tokenizer, prompts: list[str], params: Params) -> list[str]:
    """Greedy completions of the eval prompts, cut at the template's stop strings."""
    texts, _ = generate_greedy(model, tokenizer, prompts, params.data.template, params.evaluate.max_new_tokens,
                               params.evaluate.batch_size, "evaluate: generating")
    stops = stop_strings(params.data.template)
    return [cut_at_stops(t, stops) for t in texts]


def response_nll(model, tokenizer, examples, batch_size: int) -> tuple[list[float], list[int]]:
    """Per tokenized example: the summed NLL of its response tokens (teacher forcing) and their count."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    tokenizer.padding_side = "right"
    nlls: list[float] = []
    counts: list[int] = []
    for i in range(0, len(examples), batch_size):
        batch = collate([examples[j] for j in range(i, min(i + batch_size, len(examples)))]).to(model.device)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                                ignore_index=-100, reduction="none")
        nlls += nll.sum(dim=1).tolist()
        counts += (labels != -100).sum(dim=1).tolist()
    return nlls, counts


def perplexity(model, tokenizer, examples, batch_size: int) -> float:
    """exp(mean NLL) over the response tokens of tokenized eval examples."""
    nlls, counts = response_nll(model, tokenizer, examples, batch_size)
    return math.exp(sum(nlls) / max(sum(counts), 1))


def preference_pairs(records: list[dict], params: Params, tokenizer) -> tuple[list[dict], list[dict]]:
    """Preference records tokenized as tokenize tokenizes an answer: (chosen examples, rejected examples)."""
    from tasks.tokenize import encode

    def example(record: dict) -> dict:
        return {k: v for k, v in encode(record, params, tokenizer).items()
                if k in ("input_ids", "attention_mask", "labels")}

    return [example(r) for r in records], [example(with_rejected_answer(r)) for r in records]


def preference_scores(model, tokenizer, pairs: tuple[list[dict], list[dict]], batch_size: int) -> dict[str, float]:
    """win_rate: the share of pairs where sum log p(chosen | prompt) > sum log p(rejected | prompt), a tie no
    win; logp_margin: the mean of log p(chosen | prompt) - log p(rejected | prompt), the size of the preference."""
    chosen, _ = response_nll(model, tokenizer, pairs[0], batch_size)
    rejected, _ = response_nll(model, tokenizer, pairs[1], batch_size)
    n = max(len(chosen), 1)
    return {"win_rate": sum(c < r for c, r in zip(chosen, rejected, strict=True)) / n,
            "logp_margin": sum(r - c for c, r in zip(chosen, rejected, strict=True)) / n}


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rouge = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(ref, pred)
        rouge["rouge_1"] += s["rouge1"].fmeasure
        rouge["rouge_2"] += s["rouge2"].fmeasure
        rouge["rouge_l"] += s["rougeL"].fmeasure
    n = max(len(references), 1)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n
    bleu = sacrebleu.corpus_bleu(predictions, [references], force=True).score / 100
    return {**{k: v / n for k, v in rouge.items()}, "bleu": bleu, "exact_match": exact}


def score_model(model, tokenizer, params: Params, prompts, references, examples,
                pairs=None) -> tuple[dict, list[str]]:
    model.eval()
    wanted = params.evaluate.metrics
    metrics: dict[str, float] = {}
    predictions: list[str] = []
    if "perplexity" in wanted:
        metrics["perplexity"] = perplexity(model, tokenizer, examples, params.evaluate.batch_size)
    if pairs is not None:
        metrics.update(preference_scores(model, tokenizer, pairs, params.evaluate.batch_size))
    if set(wanted) - {"perplexity"}:
        predictions = generate(model, tokenizer, prompts, params)
        scores = text_scores(predictions, references)
        metrics.update({k: scores[k] for m in wanted if m != "perplexity" for k in METRIC_KEYS[m]})
    return {k: round(v, 4) for k, v in metrics.items()}, predictions


def load_candidate(params: Params):
    """Base + adapter, or the fully fine-tuned model for `lora.method: full`."""
    if params.lora.method == "full":
        return load_model(params, path=params.train.output_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(params), str(params.train.output_dir))


def eval_inputs(params: Params):
    from datasets import load_from_disk

    n = params.evaluate.num_samples
    lines = (params.data.validated_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines[:n]]
    examples = load_from_disk(str(params.data.tokenized_dir))["eval"]
    return records, examples.select(range(min(n, len(examples))))


def prompts_and_references(records: list[dict], params: Params, tokenizer) -> tuple[list[str], list[str]]:
    """Each record's rendered prompt, and its answer cut where the template's stop strings cut generations."""
    prompts, references = zip(*(render(r, params.data.format, params.data.template, tokenizer)
                                for r in records), strict=True)
    stops = stop_strings(params.data.template)
    return list(prompts), [cut_at_stops(r, stops) for r in references]


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
        mlflow.log_metrics(tracking.numeric({k: v for k, v in report.items() if isinstance(v, dict)}, "eval."))
        keep = min(params.evaluate.samples_logged, len(records))
        table = {"prompt": list(prompts[:keep]), "reference": references[:keep]}
        table.update({name: gens[:keep] for name, gens in generations.items() if gens})
        mlflow.log_table(data=table, artifact_file="eval_samples.json")
    _print_table(report)
    cand = report["candidate"]
    return {k: cand[k] for k in ("exact_match", "rouge_l", "perplexity") if k in cand}


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


if __name__ == "__main__":
    from tasks.stage import main

    main("evaluate")

"""Scoring a model on eval records: perplexity, ROUGE, BLEU, exact match, preference win rate.

The evaluate stage scores the candidate, the base and the champion with it; merge scores
a quantized copy against the full merged model with the same code.
"""

from __future__ import annotations

import json
import math

from tuneline.config import Params
from tuneline.formats import render, stop_strings, with_rejected_answer
from tuneline.models import encode, generate_greedy

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
    # Effective order: n-gram orders that no prediction reaches are left out, not scored as zero. Answers of up to
    # three words (the default task) would otherwise score 0 when every one is right, above 0 only when some are long.
    bleu = sacrebleu.corpus_bleu(predictions, [references], force=True, use_effective_order=True).score / 100
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

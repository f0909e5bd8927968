"""The tiny base model, for tests that need speed rather than language.

A byte-level BPE tokenizer learned from the task's corpus and a small random-init Llama, briefly
pre-trained on plain text of the task's words so that fine-tuning has something to build on.
"""

from __future__ import annotations

import random

from tasks.bootstrap.data import pretraining_text
from tuneline.config import Bootstrap, TinyModel
from tuneline.formats import ALPACA_HEADER, CHATML_JINJA, CHATML_SPECIAL


def tokenizer_corpus(train: list[dict], seed: int) -> list[str]:
    """The text the default tokenizer learns its merges from: the template, the train records, plain text."""
    text_rng = random.Random(seed + 2)
    corpus = [ALPACA_HEADER, "### Instruction:\n### Response:\n"]
    corpus += [f"{r['instruction']}\n\n{r['input']}\n\n{r['output']}" for r in train]
    return corpus + [pretraining_text(text_rng) for _ in range(2000)]


def build_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on the corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *CHATML_SPECIAL]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Like Llama's tokenizer: BOS in front of every encoded text with special tokens on.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHATML_JINJA
    return fast


def build_model(shape: TinyModel, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg)


def pretrain(model, tokenizer, cfg: Bootstrap) -> float:
    """A short causal-LM pre-training on `pretraining_text`; returns the final loss."""
    import torch
    from tqdm import tqdm

    rng = random.Random(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr)
    # One-cycle (5% warm-up from lr/25, cosine down): the schedule the default's quality was measured with.
    # Short runs get at least two warm-up steps, which the schedule needs.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                pct_start=max(0.05, 2 / cfg.pretrain_steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(cfg.pretrain_steps), desc="bootstrap: pre-training the base model", unit="step"):
        texts = [pretraining_text(rng) for _ in range(cfg.pretrain_batch)]
        batch = tokenizer([tokenizer.bos_token + t + tokenizer.eos_token for t in texts],
                          return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def tiny_base(cfg: Bootstrap, train: list[dict]) -> tuple[object, object, dict]:
    """The tiny base: a BPE tokenizer learned from the corpus, a random-init Llama pre-trained on its words."""
    tokenizer = build_tokenizer(tokenizer_corpus(train, cfg.seed), cfg.model.vocab_size)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    return model, tokenizer, {"vocab_size": len(tokenizer), "pretrain_loss": round(pretrain(model, tokenizer, cfg), 4)}

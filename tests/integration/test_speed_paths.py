"""The training speed paths must not change the numbers: packing and the chunked loss (fp32, CPU)."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

from tuneline.training.loss import chunked_cross_entropy, install


def losses(reports) -> list[float]:
    """The losses a train stage logged to its reports folder."""
    return [float(r["loss"]) for r in csv.DictReader((reports / "train_log.csv").open())]


def tiny_llama(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).float().eval()


def examples(n: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = 9 + 7 * i
        ids = torch.randint(3, 300, (length,), generator=g).tolist()
        prompt = length // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def pad(batch: list[dict]) -> dict:
    n = max(len(e["input_ids"]) for e in batch)
    return {"input_ids": torch.tensor([e["input_ids"] + [0] * (n - len(e["input_ids"])) for e in batch]),
            "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"]))
                                            for e in batch]),
            "labels": torch.tensor([e["labels"] + [-100] * (n - len(e["labels"])) for e in batch])}


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, rows: list[slice]) -> list[float]:
    token_loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
    return [float(token_loss[r][labels[0, 1:][r] != -100].mean()) for r in rows]


def test_packed_and_padded_batches_give_the_same_per_example_loss():
    model, batch = tiny_llama(), examples()
    padded_batch = pad(batch)
    with torch.no_grad():
        logits = model(input_ids=padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"]).logits
    unpacked = []
    for i, e in enumerate(batch):
        n = len(e["input_ids"])
        unpacked += per_example_losses(logits[i:i + 1, :n], padded_batch["labels"][i:i + 1, :n], [slice(0, n - 1)])

    packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(batch)
    assert packed["input_ids"].shape[0] == 1 and int(packed["position_ids"][0, 0]) == 0
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits
    bounds, start = [], 0
    for e in batch:
        bounds.append(slice(start, start + len(e["input_ids"]) - 1))
        start += len(e["input_ids"])
    assert per_example_losses(packed_logits, packed["labels"], bounds) == pytest.approx(unpacked, abs=1e-4)


def test_packing_without_position_ids_would_leak_across_examples():
    """The check above can fail: without restarting positions, examples attend to each other."""
    model, batch = tiny_llama(), examples()
    packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(batch)
    with torch.no_grad():
        right = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits
    second = slice(len(batch[0]["input_ids"]), len(batch[0]["input_ids"]) + len(batch[1]["input_ids"]))
    assert (right[0, second] - leaky[0, second]).abs().max() > 1e-3


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_loss_equals_plain_loss_and_gradient(compiled):
    torch.manual_seed(2)
    hidden = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[:, :5] = -100
    plain = F.cross_entropy((hidden @ weight.t())[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1),
                            ignore_index=-100)
    chunked = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=8, compiled=compiled)
    assert torch.allclose(chunked, plain, atol=1e-10)
    g_plain = torch.autograd.grad(plain, (hidden, weight))
    g_chunk = torch.autograd.grad(chunked_cross_entropy(hidden, weight, labels, chunk_tokens=8, compiled=compiled),
                                  (hidden, weight))
    for a, b in zip(g_plain, g_chunk, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_installed_chunked_loss_matches_the_model_loss():
    model, batch = tiny_llama(), examples()
    padded = pad(batch)
    with torch.no_grad():
        reference = model(**padded).loss
    compute_loss, restore = install(model, chunk_tokens=16)
    labels = padded.pop("labels")
    with torch.no_grad():
        outputs = model(**padded)
        assert outputs.logits.shape[-1] == model.config.hidden_size  # no vocabulary-wide logits
        assert torch.allclose(compute_loss(outputs, labels), reference, atol=1e-5)
    restore()
    assert model(**padded).logits.shape[-1] == model.config.vocab_size


@pytest.mark.parametrize("pad_to_multiple", [0, 96], ids=["packed", "packed-padded"])
def test_train_stage_with_packing_and_chunked_loss_follows_the_same_curve(tiny_run, tmp_path, pad_to_multiple):
    """The engine's packed, chunked-loss path logs the same losses as the padded default (fp32), and counts the
    same tokens seen; with each packed row padded up to a multiple of 96 tokens too."""
    from tasks import run_stage
    from tuneline.atomic import read_json

    params, _ = tiny_run
    fast = params.model_copy(update={
        "reports_dir": tmp_path / "reports",
        "train": params.train.model_copy(update={"packing": True, "chunked_loss": True, "loss_chunk_tokens": 64,
                                                 "pad_to_multiple": pad_to_multiple,
                                                 "output_dir": tmp_path / "adapter",
                                                 "checkpoint_dir": tmp_path / "ckpt"})})
    run_stage("train", fast)

    assert losses(tmp_path / "reports") == pytest.approx(losses(params.reports_dir), rel=1e-4)
    assert read_json(tmp_path / "reports" / "train.json")["tokens_seen"] == \
        read_json(params.reports_dir / "train.json")["tokens_seen"]  # padding is not counted
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_padding_a_packed_row_keeps_loss_and_gradients():
    from tuneline.training.batching import PADDING, PaddedPacking

    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    results = []
    for collate in (flatten, PaddedPacking(flatten, 64, pad_id=0)):
        model = tiny_llama()
        batch = collate(examples())
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                     use_cache=False).loss
        loss.backward()
        results.append((batch, loss.detach(), [p.grad for p in model.parameters()]))
    (plain, plain_loss, plain_grads), (padded, padded_loss, padded_grads) = results
    n = plain["input_ids"].shape[1]
    assert n % 64 and padded["input_ids"].shape[1] == n + padded[PADDING] == -(-n // 64) * 64
    assert (padded["labels"][0, n:] == -100).all() and padded["position_ids"][0, n] == 0
    assert torch.allclose(padded_loss, plain_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(padded_grads, plain_grads, strict=True))


def test_token_budget_batches_train_through_the_stage_and_stay_under_budget(tiny_run, tmp_path, monkeypatch):
    """train.batch_tokens: every step's packed batch holds at most the budget (or one longer example), the
    whole data is seen, and the stage trains to the same kind of result. Without packing it is refused."""
    from tasks import run_stage
    from tasks.train import sft
    from tuneline.errors import TunelineError

    params, _ = tiny_run
    budget = 256
    fast = params.model_copy(update={
        "reports_dir": tmp_path / "reports",
        "train": params.train.model_copy(update={"packing": True, "batch_tokens": budget,
                                                 "output_dir": tmp_path / "adapter",
                                                 "checkpoint_dir": tmp_path / "ckpt"})})
    seen: list[int] = []
    real_build = sft.build_trainer

    def watched(*args, **kwargs):
        trainer, restore = real_build(*args, **kwargs)
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        for batch in trainer.get_train_dataloader():
            assert batch["input_ids"].shape[0] == 1  # padding-free: one row
            seen.append(batch["input_ids"].shape[1])
            assert seen[-1] <= max(budget, max(lengths))
        assert sum(seen) == sum(lengths)  # one epoch: every example once
        return trainer, restore

    monkeypatch.setattr(sft, "build_trainer", watched)
    summary = run_stage("train", fast)
    assert len(seen) > 1 and summary["steps"] == params.train.max_steps
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    plain = fast.model_copy(update={"train": fast.train.model_copy(update={"packing": False})})
    with pytest.raises(TunelineError, match="batch_tokens needs packed rows"):
        run_stage("train", plain)


def test_skipping_checkpointing_on_the_last_layers_keeps_loss_and_gradients():
    from tuneline.training.supervision import skip_checkpointing

    def loss_and_grads(skip: int):
        model = tiny_llama().train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        skip_checkpointing(model, skip)
        batch = pad(examples(3))
        loss = model(**batch).loss
        loss.backward()
        flags = [layer.gradient_checkpointing for layer in model.model.layers]
        return loss.item(), [p.grad.clone() for p in model.parameters()], flags

    full, full_grads, full_flags = loss_and_grads(0)
    skipped, skipped_grads, flags = loss_and_grads(1)
    assert full_flags == [True, True] and flags == [True, False]
    assert skipped == pytest.approx(full, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full_grads, skipped_grads, strict=True))


def test_qlora_trains_an_adapter_over_a_4bit_base(tiny_run, tmp_path):
    """`lora.method: qlora`: the frozen base is NF4 (bitsandbytes, on CPU here), the adapter learns as LoRA does."""
    from bitsandbytes.nn import Linear4bit

    from tasks import run_stage
    from tuneline.models import load_model

    params, _ = tiny_run
    qlora = params.model_copy(update={
        "reports_dir": tmp_path / "reports", "lora": params.lora.model_copy(update={"method": "qlora"}),
        "train": params.train.model_copy(update={"output_dir": tmp_path / "adapter",
                                                 "checkpoint_dir": tmp_path / "ckpt"})})
    assert any(isinstance(m, Linear4bit) for m in load_model(qlora, quantize=True).modules())
    run_stage("train", qlora)

    # 4-bit weights move the numbers a little, not the curve: same start and end within 5%.
    assert losses(tmp_path / "reports") == pytest.approx(losses(params.reports_dir), rel=0.05)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("regions, skip, fused", [(True, 1, False), (False, 0, "auto"), (False, 0, True)],
                         ids=["regions-skip-1", "whole", "whole-fused-lora"])
def test_compiled_training_follows_the_plain_curve_and_saves_plain_adapter_keys(tiny_run, tmp_path, monkeypatch,
                                                                                regions, skip, fused):
    """train.compile, with train.compile_regions (one compiled decoder layer that the others reuse, dynamic
    shapes from the first step for packed rows) and the (tiny project's one) layer kept out of gradient
    checkpointing, or whole with the layer checkpointed (train.fused_lora's default, auto, keeping PEFT's forward on
    a CPU), and with train.fused_lora: the losses of the plain run (fp32), the layer that runs (a compiled copy)
    really in or out of checkpointing, no graph break, and an adapter whose tensor names carry no trace of the
    compiler (it loads into the uncompiled model)."""
    from safetensors import safe_open
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tasks import run_stage
    from tasks.train import sft

    params, _ = tiny_run
    compiled = params.model_copy(update={
        "reports_dir": tmp_path / "reports",
        "train": params.train.model_copy(update={"compile": True, "compile_regions": regions,
                                                 "gradient_checkpointing": True, "checkpoint_skip_layers": skip,
                                                 "fused_lora": fused, "output_dir": tmp_path / "adapter",
                                                 "checkpoint_dir": tmp_path / "ckpt"})})
    trainers = []
    real_build = sft.build_trainer

    def kept(*args, **kwargs):
        trainers.append(real_build(*args, **kwargs)[0])
        return trainers[-1], lambda: None

    monkeypatch.setattr(sft, "build_trainer", kept)
    torch._dynamo.utils.counters.clear()
    run_stage("train", compiled)

    # Nothing in a checkpointed layer or at the embeddings breaks the graph: the kernels package's context
    # variable (a side effect under checkpointing) and transformers' input-grad hooks (`requires_grad_`) did.
    breaks = "\n".join(torch._dynamo.utils.counters["graph_break"])
    assert "Attempted to mutate" not in breaks and "requires_grad_" not in breaks, breaks

    assert len(losses(tmp_path / "reports")) == 3
    assert losses(tmp_path / "reports") == pytest.approx(losses(params.reports_dir), rel=1e-3)
    ran = [m for m in trainers[0].model_wrapped.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert ran and ran[-1].gradient_checkpointing is (skip == 0)
    assert any(type(m).__name__ == "OptimizedModule" for m in trainers[0].model_wrapped.modules())
    lora_layers = [m for m in trainers[0].model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and all(("forward" in vars(m)) is (fused is True) for m in lora_layers)  # addmm's, or PEFT's
    names = []
    for adapter in (tmp_path / "adapter", params.train.output_dir):
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            names.append(list(f.keys()))
    assert names[0] == names[1] and not any("_orig_mod" in k for k in names[0])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_lora_keeps_peft_loss_and_gradients(compiled):
    """train.fused_lora: the same loss and gradients as PEFT's LoRA forward, with dropout and checkpointing as
    training runs them; with the adapter off (DPO's reference pass) the base model's output; DoRA keeps PEFT's."""
    from peft import LoraConfig, get_peft_model

    from tuneline.training import lora_matmul

    def lora_model(fused: bool, dora: bool = False):
        model = tiny_llama()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=dora,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: a non-zero update exercises the scaled product
                torch.nn.init.normal_(p, std=0.05)
        return model.train(), (lora_matmul.install(model) if fused else 0)

    batch = pad(examples(3))

    def loss_and_grads(model):
        torch.manual_seed(5)  # the same dropout masks
        run = torch.compile(model, backend="inductor") if compiled else model
        loss = run(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (plain, _), (fused, installed) = lora_model(False), lora_model(True)
    assert installed == 14  # seven projections in each of two layers
    plain_loss, plain_grads = loss_and_grads(plain)
    fused_loss, fused_grads = loss_and_grads(fused)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_grads.keys() == fused_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name
    with torch.no_grad(), fused.disable_adapter():
        off = fused.eval()(**batch).logits
    assert torch.allclose(off, tiny_llama()(**batch).logits, atol=1e-6)

    dora, installed = lora_model(True, dora=True)
    assert installed == 14
    with torch.no_grad():
        assert torch.allclose(dora.eval()(**batch).logits, lora_model(False, dora=True)[0].eval()(**batch).logits)

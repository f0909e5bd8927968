"""Distributed training: how many processes, how they are launched, how they shard.

With more than one process the train stage relaunches itself through torchrun
(`python -m torch.distributed.run ... -m tasks train`); every worker runs the
same `train` function, and transformers' Trainer (through accelerate) sets up
DDP, FSDP or DeepSpeed ZeRO from the environment torchrun gives it. Only rank 0
writes outputs and talks to MLflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import yaml

from tuneline.config import Params
from tuneline.errors import TunelineError


@dataclass(frozen=True)
class Plan:
    nproc_per_node: int
    nnodes: int

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def plan(params: Params) -> Plan:
    d = params.distributed
    if d.strategy == "none":
        return Plan(1, 1)
    if d.nproc_per_node == "auto":
        import torch

        n = torch.cuda.device_count() or 1
    else:
        n = d.nproc_per_node
    return Plan(n, d.nnodes)


def is_worker() -> bool:
    """True inside a process that torchrun started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def torchrun_command(params: Params, p: Plan, params_file: str) -> list[str]:
    d = params.distributed
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={p.nproc_per_node}",
           f"--nnodes={p.nnodes}"]
    if p.nnodes > 1:
        if not d.rdzv_endpoint:
            raise TunelineError("distributed.rdzv_endpoint: required (host:port) when distributed.nnodes > 1")
        cmd += [f"--node-rank={d.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={d.rdzv_endpoint}",
                "--rdzv-id=tuneline-train"]
    else:
        cmd += ["--standalone"]
    run = ["--mlflow-run-id", params.mlflow_run_id] if params.mlflow_run_id else []
    return [*cmd, "-m", "tasks", "train", "--params", params_file, *run]


def relaunch(params: Params) -> None:
    """Run the train stage in `world_size` processes; returns when they all finish."""
    p = plan(params)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tuneline-params-", delete=False) as f:
        # The resolved params (overrides applied), so every worker trains exactly this config.
        yaml.safe_dump(params.model_dump(mode="json", by_alias=True), f, sort_keys=False)
    cmd = torchrun_command(params, p, f.name)
    print(f"train: launching {p.world_size} processes ({params.distributed.strategy}) through torchrun")
    try:
        code = subprocess.run(cmd, check=False).returncode
    finally:
        os.unlink(f.name)
    if code != 0:
        raise TunelineError(f"train: the distributed run failed (torchrun exit code {code}); "
                            "the workers' messages are above")


def trainer_kwargs(params: Params) -> dict:
    """The TrainingArguments that select FSDP or DeepSpeed (DDP needs none: it is the default)."""
    d = params.distributed
    if d.strategy == "fsdp":
        # FSDP2 (per-parameter sharding): frozen bf16 base and fp32 LoRA weights shard side by side.
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": _decoder_layer_names(params)}}
    if d.strategy == "deepspeed":
        zero: dict = {"stage": d.deepspeed.stage, "overlap_comm": True}
        if d.deepspeed.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if d.deepspeed.offload_params:
            if d.deepspeed.stage != 3:
                raise TunelineError("distributed.deepspeed.offload_params: needs deepspeed.stage 3")
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if d.deepspeed.stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {"deepspeed": {"zero_optimization": zero, "bf16": {"enabled": "auto"},
                              "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}}
    return {}


def _decoder_layer_names(params: Params) -> list[str]:
    """The model's transformer-block class, for FSDP's auto-wrap policy (read from its config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(params.model.base, trust_remote_code=params.model.trust_remote_code)
    cls = AutoModelForCausalLM._model_mapping[type(config)]
    names = getattr(cls, "_no_split_modules", None)
    if not names:
        raise TunelineError(f"model.base: {cls.__name__} names no transformer layer class for FSDP auto-wrap")
    return list(names)

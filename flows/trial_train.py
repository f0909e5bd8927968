"""One sweep trial's training: its values drawn from the search space, its own params, its short run.

The run uses the pipeline's Trainer (tuneline/training/trainer.py) with a callback that sends every
eval loss to Optuna's pruner and to the trial's MLflow run, and stops the run when the pruner says so.
"""

from __future__ import annotations

from pathlib import Path

from tuneline.config import Params, Sweep


def suggest(trial, s: Sweep) -> dict:
    """The trial's values, named by their params.yaml keys."""
    r = trial.suggest_categorical("lora.r", s.lora_r)
    return {"train.learning_rate": trial.suggest_float("train.learning_rate", s.learning_rate.low,
                                                       s.learning_rate.high, log=True),
            "lora.r": r,
            "lora.alpha": 2 * r if s.lora_alpha == "2r" else trial.suggest_categorical("lora.alpha", s.lora_alpha),
            "train.batch_size": trial.suggest_categorical("train.batch_size", s.batch_size)}


def trial_params(params: Params, values: dict, scratch: Path) -> Params:
    """The trial's own params: its values, a short run, one process, nothing near the pipeline's checkpoints."""
    p = params.model_copy(deep=True)
    s = params.sweep
    for dotted, value in {**values, "train.max_steps": s.max_steps, "train.eval_steps": s.eval_steps,
                          "train.checkpoint_dir": scratch, "distributed.strategy": "none"}.items():
        section, key = dotted.split(".")
        setattr(getattr(p, section), key, value)
    return p


def train_trial(trial, params: Params, data, tokenizer):
    """Train the trial's adapter on the pipeline's Trainer; the reporter holds its eval losses and fate."""
    from transformers import set_seed

    from tuneline.training.trainer import build_trainer, load_base, training_args, with_adapter

    set_seed(params.train.seed)
    model = with_adapter(load_base(params), params)
    reporter = _reporter(trial)
    trainer, restore_head = build_trainer(params, training_args(params, has_eval=True), model, tokenizer,
                                          data["train"], data["eval"], [reporter])
    try:
        trainer.train()
    finally:
        restore_head()
    return reporter


def _reporter(trial):
    """A Trainer callback: every eval loss to Optuna and to the trial's MLflow run; stop when the pruner says so."""
    import mlflow
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        eval_loss: float | None = None
        pruned_at: int | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            step = state.global_step
            self.eval_loss = metrics["eval_loss"]
            mlflow.log_metric("eval_loss", self.eval_loss, step=step)
            trial.report(self.eval_loss, step)
            if step < state.max_steps and trial.should_prune():  # a trial that got to its end is complete
                self.pruned_at = step
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = False  # a trial's weights are thrown away: no checkpoint is worth its time

    return Reporter()

"""The deployments of prefect.yaml by full name (`<flow>/<deployment>`), for the code that runs or finds them,
and the name of the automation that starts a run on new data."""

from __future__ import annotations

FINETUNE_ON_DEMAND = "finetune/finetune-on-demand"  # the run form: the knobs, `sets`, `overrides`
FINETUNE_ON_NEW_DATA = "finetune/finetune-on-new-data"  # started by the event tuneline.data.updated
FINETUNE_SCHEDULED = "finetune/finetune-scheduled-retrain"  # orchestration.retrain_cron
SWEEP_ON_DEMAND = "sweep/sweep-on-demand"
DEPLOYMENTS = (FINETUNE_ON_DEMAND, FINETUNE_ON_NEW_DATA, FINETUNE_SCHEDULED, SWEEP_ON_DEMAND)

DATA_UPDATED_AUTOMATION = "finetune on tuneline.data.updated"  # prefect.yaml: the trigger's name

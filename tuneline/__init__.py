"""Tuneline's foundation: what the stages, the serving app and the flows share.

config (the typed Params), errors, atomic writes, S3, data formats, model loading, MLflow tracking
and registry, the training engine (training/), scoring, quantized export, cost. Nothing here
imports the stages (tasks/), serving/ or flows/.
"""

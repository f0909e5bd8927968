"""The fine-tuning half of the OpenAI API: `/v1/files` and `/v1/fine_tuning/jobs` on the serving endpoint.

A team that fine-tunes through the `openai` client points `base_url` at Tuneline and keeps its code:

- files.py: uploads, stored once per content hash under `jobs.files_dir`, written atomically; their
  JSON Lines format is checked on upload (one record per line, a known format);
- store.py: files, jobs and their events in a SQL database (SQLite by default, PostgreSQL by URL);
- tenants.py: API keys (from the environment or a key file), each belonging to a tenant;
- runs.py: a job as a run of the Prefect deployment `finetune/finetune-on-demand`, its hyperparameters mapped
  onto params, its own folder for data, models and reports; the job's state read back from Prefect;
- results.py: what a job's folder tells once it ran: tokens, per-step metrics, checkpoints, the model;
- service.py: the job lifecycle (validating_files -> queued -> running -> succeeded/failed/cancelled);
- api.py: the FastAPI routes; serve_app.py: the Ray Serve applications beside the model's router.
"""

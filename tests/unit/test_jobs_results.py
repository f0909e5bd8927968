"""What a finished job's folder tells the API (flows/jobs/results.py), and the gate rule: a rejected candidate
is a succeeded job with no model and an event that gives the gate's reasons (flows/jobs/service.py)."""

from __future__ import annotations

import yaml
from support.project import tiny_params

from flows.jobs import results, runs
from flows.jobs.service import JobService
from flows.jobs.store import now
from flows.jobs.wire import parse_method
from tuneline.atomic import write_json, write_text

LOG = "step,epoch,loss,learning_rate,grad_norm,tokens_per_s,mfu,peak_mem_gib\n" + "".join(
    f"{s},{s / 6:.2f},{loss},0.005,1.0,900,,\n" for s, loss in ((2, 3.0), (4, 2.0), (6, 9.0)))


def _service(tmp_path) -> JobService:
    params = tiny_params(tmp_path, train__save_steps=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return JobService(tmp_path, tmp_path / "params.yaml", {}, background=False)


def test_folder_gives_rows_checkpoints_health_and_csv(tmp_path):
    params = tiny_params(tmp_path, train__save_steps=3, train__max_steps=6)
    write_text(params.report("train_log.csv"), LOG)
    rows = results.train_rows(params)
    assert [r["step"] for r in rows] == [2, 4, 6] and results.fraction_done(params, rows) == 1.0
    assert [c["step"] for c in results.checkpoints(params, rows)] == [6]  # saved at 3 and 6; 3 was not logged
    lines = results.health_lines(rows, spike_factor=3.0)
    assert lines[0] == ("info", "step 2: loss 3, learning_rate 0.005, grad_norm 1, tokens_per_s 900")
    assert lines[-1][0] == "warn" and "step 6: loss spike, 9.0000 is over 3.0x the running mean 2.5000" in lines[-1][1]
    assert results.metrics_csv(rows).splitlines()[:2] == ["step,train_loss,learning_rate,grad_norm,tokens_per_s,epoch",
                                                          "2,3.0,0.005,1.0,900.0,0.33"]


def test_a_gate_reject_is_a_succeeded_job_without_a_model(tmp_path):
    service = _service(tmp_path)
    record = b'{"instruction": "Which word is a fruit?", "input": "pear dog", "output": "pear"}\n'
    upload = service.files.upload("acme", "t.jsonl", "fine-tune", [record])
    job = {"id": "ftjob-00000000000000000000abcd", "tenant": "acme", "created_at": now(), "status": "running",
           "model": "tuneline-default", "training_file": upload["id"], "validation_file": None, "suffix": None,
           "seed": 1, "metadata": None, "method": parse_method({}), "cancel_requested": 0}
    service.store.add_job(job)
    params = service.job_params(job)
    assert params.registry.model_name == runs.registered_name("acme", None, job["id"])
    write_text(params.report("train_log.csv"), LOG)
    write_json(params.report("train.json"), {"tokens_seen": 1234})
    write_json(params.report("gate.json"), {"decision": "reject", "reasons": ["rouge_l 0.1 < 0.5"]})

    service._finish(job["id"], "succeeded", "")
    done = service.job("acme", job["id"])
    assert done["status"] == "succeeded" and done["result"]["fine_tuned_model"] is None
    assert done["result"]["trained_tokens"] == 1234
    (result_file,) = done["result"]["result_files"]
    assert service.files.content("acme", result_file).decode().startswith("step,train_loss")
    events = {e["message"]: e["level"] for e in service.store.events(job["id"])}
    assert events["The gate rejected the candidate, so no model was registered: rouge_l 0.1 < 0.5"] == "warn"

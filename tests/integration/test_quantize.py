"""merge.quantize: a torchao int8 copy of the merged model, written, loadable, scored against the full model."""

from __future__ import annotations

import shutil

import pytest
from support.project import tiny_params

from tasks import run_stage
from tuneline.atomic import read_json
from tuneline.errors import TunelineError
from tuneline.quantize import retention


@pytest.fixture(scope="module")
def int8_run(tiny_run, tmp_path_factory):
    """The tiny project copied (its registry too, so tiny_run's versions stay as they are), merged with int8."""
    params, _ = tiny_run
    root = tmp_path_factory.mktemp("quantize")
    shutil.copytree(params.data.root, root, dirs_exist_ok=True)
    quantized = tiny_params(root, merge__quantize="int8")
    return quantized, run_stage("merge", quantized)


def test_int8_copy_is_written_smaller_and_int8(int8_run):
    import torch

    from tuneline.quantize import load_quantized, quantized_dir

    params, result = int8_run
    out = quantized_dir(params)
    assert out == params.merge.output_dir.with_name("merged-int8")
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # nothing pickled
    full = (params.merge.output_dir / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < full

    model = load_quantized(out)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    generated = model.generate(torch.tensor([[1, 2, 3]]), min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    assert result["int8_retention"] == read_json(params.report("quantize.json"))["retention"]


def test_quantize_report_has_sizes_scores_and_retention(int8_run):
    params, _ = int8_run
    report = read_json(params.report("quantize.json"))
    assert report["quantize"] == "int8" and report["num_samples"] == 16
    assert 0 < report["size_mib"]["quantized"] < report["size_mib"]["full"]
    rouge, metrics = report["rouge_l"], report["metrics"]
    assert rouge == {name: metrics[name]["rouge_l"] for name in ("full", "quantized")}
    assert report["retention"] == retention(rouge["full"], rouge["quantized"])
    # the tiny model's ROUGE-L is ~0, so its retention says little: int8 must keep its perplexity instead
    assert metrics["quantized"]["perplexity"] == pytest.approx(metrics["full"]["perplexity"], rel=0.02)
    merge = read_json(params.report("merge.json"))
    assert merge["quantized"] == {k: report[k] for k in ("model_dir", "size_mib", "retention")}


def test_retention_is_the_rouge_l_ratio():
    assert retention(0.5, 0.485) == 0.97
    assert retention(0.4, 0.6) == 1.5
    assert retention(0.0, 0.0) is None  # a full model that matches nothing has no quality to retain


def test_int4_on_cpu_fails_before_any_work(tiny_run, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("int4 runs on a CUDA GPU")
    params, _ = tiny_run
    int4 = params.model_copy(update={"merge": params.merge.model_copy(
        update={"quantize": "int4", "output_dir": tmp_path / "merged"})})
    with pytest.raises(TunelineError, match=r"merge\.quantize: int4 needs a CUDA GPU"):
        run_stage("merge", int4)
    assert not list(tmp_path.iterdir())

"""The batch job takes the same model spellings as every other entry point (engine/sources.py):
a folder, a Hub id resolved offline through a real Hugging Face cache layout, random:<shape>;
a bad model stops the job before it touches the output folder; the manifest records the
resolved commit so --resume refuses a model that moved under the same id."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.cli import main as cli_main
from instructrec.engine.batch import JobOutputError, run_job
from instructrec.engine.job_model import EngineSettings, JobModel
from instructrec.engine.errors import InputError
from instructrec.engine.sources import EXPORT_MANIFEST_NAME

from ..conftest import TINY_HUB_COMMIT, TINY_HUB_ID, TINY_T5, build_t5_checkpoint, populate_hf_cache

ROWS = 9


def write_requests(path):
    pq.write_table(pa.table({
        "request_id": [f"r{i}" for i in range(ROWS)],
        "candidates": [[f"racing game {i} volume {j}" for j in range(2 + i % 3)] for i in range(ROWS)],
        "instruction": [f"Recommend a game to a fan of puzzle number {i}" for i in range(ROWS)],
    }), path)
    return path


def rerank(*args: str) -> int:
    """`instructrec rerank` in this process (its one-line error goes to the log: caplog)."""
    return cli_main(["rerank", "--no-progress", "--dtype", "float32", "--threads", "1", *map(str, args)])


def test_rerank_with_a_hub_id_equals_the_same_folder_passed_as_a_path(offline_hf_home, tiny_t5_dir, tmp_path):
    requests = write_requests(tmp_path / "requests.parquet")
    assert rerank("--model", tiny_t5_dir, "--input", requests, "--output", tmp_path / "by-path",
                  "--rows-per-part", 4) == 0
    assert rerank("--model", TINY_HUB_ID, "--input", requests, "--output", tmp_path / "by-id",
                  "--rows-per-part", 4) == 0
    by_path, by_id = pq.read_table(tmp_path / "by-path"), pq.read_table(tmp_path / "by-id")
    assert by_id.num_rows == ROWS and by_id.column("error").null_count == ROWS
    assert by_id.equals(by_path)  # same weights, same chunks: bit for bit
    model = json.loads((tmp_path / "by-id" / "_job.json").read_text())["model"]
    assert model["repo_id"] == TINY_HUB_ID and model["commit"] == TINY_HUB_COMMIT
    options = json.loads((tmp_path / "by-id" / "_job.json").read_text())["options"]
    assert options["backend"] == "torch" and options["dtype"] == "float32" and options["threads"] == 1


@pytest.mark.parametrize("model, message", [
    ("flan-t5-small", "google/flan-t5-small"),  # a bare shape name: pretrained or random?
    ("instructrec-tests/not-cached", "is not in the Hugging Face cache"),
    ("random:no-such-shape", "unknown random shape"),
])
def test_a_bad_model_exits_2_before_the_output_folder_is_touched(offline_hf_home, tmp_path, caplog, model, message):
    requests = write_requests(tmp_path / "requests.parquet")
    assert rerank("--model", model, "--input", requests, "--output", tmp_path / "out") == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists()  # no folder, so no _job.lock and no _job.json


def test_resume_refuses_a_hub_model_that_moved_under_the_same_id(offline_hf_home, tiny_t5_dir, tokenizer_dir,
                                                                  tmp_path, caplog):
    requests = write_requests(tmp_path / "requests.parquet")
    output = tmp_path / "out"
    assert rerank("--model", TINY_HUB_ID, "--input", requests, "--output", output, "--rows-per-part", 4) == 0
    reference = pq.read_table(output)
    # The last part never finished (as after a crash); meanwhile main moved to a retrained model.
    (output / "part-00002.parquet").unlink()
    retrained = build_t5_checkpoint(tmp_path / "retrained", tokenizer_dir, TINY_T5, seed=1)
    new_commit = "fedcba9876543210fedcba9876543210fedcba98"
    populate_hf_cache(offline_hf_home, TINY_HUB_ID, retrained, new_commit)
    caplog.clear()

    assert rerank("--model", TINY_HUB_ID, "--input", requests, "--output", output, "--rows-per-part", 4,
                  "--resume") == 2
    err = caplog.text
    assert (f"the model changed since the run that wrote {output}: {TINY_HUB_ID} now resolves to commit "
            f"{new_commit}, but the output was written with {TINY_HUB_ID} at commit {TINY_HUB_COMMIT}") in err
    assert f"resume with --revision {TINY_HUB_COMMIT}" in err
    assert not (output / "part-00002.parquet").exists()  # nothing was written

    # Pinning the old commit finishes the job with the weights it started with.
    assert rerank("--model", TINY_HUB_ID, "--revision", TINY_HUB_COMMIT, "--input", requests, "--output", output,
                  "--rows-per-part", 4, "--resume") == 0
    assert pq.read_table(output).equals(reference)


def test_resume_refuses_a_folder_model_retrained_in_place(tiny_t5_dir, tokenizer_dir, tmp_path):
    model = shutil.copytree(tiny_t5_dir, tmp_path / "model")
    requests = write_requests(tmp_path / "requests.parquet")
    run_job(model, requests, tmp_path / "out", dtype="float32", progress=False)
    build_t5_checkpoint(model, tokenizer_dir, TINY_T5, seed=2)  # retrained into the same folder
    with pytest.raises(JobOutputError, match="the model folder .* changed since the output was written .*"
                                             "model.safetensors"):
        run_job(model, requests, tmp_path / "out", dtype="float32", resume=True, progress=False)


def test_backend_auto_is_picked_from_the_folder_kind(tiny_t5_dir, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / EXPORT_MANIFEST_NAME).write_text(json.dumps({"t5_config": {"d_model": 8}}))
    assert JobModel.resolve(export, EngineSettings()).settings.backend == "onnx"
    assert JobModel.resolve(tiny_t5_dir, EngineSettings()).settings.backend == "torch"
    with pytest.raises(InputError, match="is an ONNX export, which the torch backend cannot load"):
        JobModel.resolve(export, EngineSettings(backend="torch"))
    with pytest.raises(InputError, match="is not an ONNX export"):
        JobModel.resolve(tiny_t5_dir, EngineSettings(backend="onnx"))


def test_a_random_shape_ranks_with_the_tokenizer_given_and_resumes_to_the_same_output(tokenizer_dir, tmp_path,
                                                                                        caplog):
    requests = write_requests(tmp_path / "requests.parquet")
    output = tmp_path / "out"
    assert rerank("--model", "random:t5-tiny", "--input", requests, "--output", output, "--rows-per-part", 4) == 2
    assert "tokenizer" in caplog.text  # random weights carry no tokenizer: said, and nothing written
    assert not output.exists()

    assert rerank("--model", "random:t5-tiny", "--tokenizer", tokenizer_dir, "--input", requests, "--output", output,
                  "--rows-per-part", 4) == 0
    first = pq.read_table(output)
    assert first.num_rows == ROWS and first.column("error").null_count == ROWS
    model = json.loads((output / "_job.json").read_text())["model"]
    assert model["kind"] == "random" and model["shape"] == "t5-tiny" and model["tokenizer"] == str(tokenizer_dir)
    # Seeded weights: a resumed random model ranks a lost part exactly as before.
    (output / "part-00001.parquet").unlink()
    assert rerank("--model", "random:t5-tiny", "--tokenizer", tokenizer_dir, "--input", requests, "--output", output,
                  "--rows-per-part", 4, "--resume") == 0
    assert pq.read_table(output).equals(first)


def test_an_export_folder_ranks_on_onnxruntime_without_backend_flag(tiny_t5_dir, tmp_path):
    """`rerank --model <instructrec export>`: the backend comes from the folder (onnx), and the
    rankings are the checkpoint's."""
    import numpy as np

    from instructrec.export import export_model

    export_model(tiny_t5_dir, tmp_path / "export")
    requests = write_requests(tmp_path / "requests.parquet")
    assert rerank("--model", tmp_path / "export", "--input", requests, "--output", tmp_path / "onnx") == 0
    assert rerank("--model", tiny_t5_dir, "--input", requests, "--output", tmp_path / "torch") == 0
    options = json.loads((tmp_path / "onnx" / "_job.json").read_text())["options"]
    assert options["backend"] == "onnx"
    onnx, torch = pq.read_table(tmp_path / "onnx"), pq.read_table(tmp_path / "torch")
    assert onnx.column("ranked_ids").to_pylist() == torch.column("ranked_ids").to_pylist()
    for got, want in zip(onnx.column("scores").to_pylist(), torch.column("scores").to_pylist()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # two runtimes, float32


# ------------------------------------------------------------------------------------------ --ensemble


def test_an_ensemble_job_ranks_by_each_models_standardised_scores_summed(tiny_t5_dir, tokenizer_dir, tmp_path):
    """The ensemble's output recomputed from two one-model jobs' outputs: each request's scores
    standardised by hand and summed per candidate id."""
    import numpy as np

    requests = write_requests(tmp_path / "requests.parquet")
    second = build_t5_checkpoint(tmp_path / "seed-1", tokenizer_dir, TINY_T5, seed=1)
    for name, models in (("a", [tiny_t5_dir]), ("b", [second]), ("ab", [tiny_t5_dir, "--ensemble", second])):
        assert rerank("--model", *models, "--input", requests, "--output", tmp_path / name, "--rows-per-part", 4) == 0
    alone = [pq.read_table(tmp_path / name).to_pylist() for name in ("a", "b")]
    both = pq.read_table(tmp_path / "ab").to_pylist()
    for row, a, b in zip(both, *alone):
        expected = {}
        for single in (a, b):
            scores = np.array(single["scores"])
            for cid, z in zip(single["ranked_ids"], (scores - scores.mean()) / scores.std()):
                expected[cid] = expected.get(cid, 0.0) + z
        assert row["error"] is None and dict(zip(row["ranked_ids"], row["scores"])) == pytest.approx(expected, abs=1e-9)
        assert row["scores"] == sorted(row["scores"], reverse=True)  # (two-candidate lists often tie at 0)
    manifest = json.loads((tmp_path / "ab" / "_job.json").read_text())["model"]
    assert manifest["path"] == str(tiny_t5_dir) and [m["path"] for m in manifest["ensemble"]] == [str(second)]
    assert "ensemble" not in json.loads((tmp_path / "a" / "_job.json").read_text())["model"]


def test_resume_refuses_another_ensemble_and_finishes_with_the_same(tiny_t5_dir, tokenizer_dir, tmp_path, caplog):
    requests = write_requests(tmp_path / "requests.parquet")
    second = build_t5_checkpoint(tmp_path / "seed-1", tokenizer_dir, TINY_T5, seed=1)
    third = build_t5_checkpoint(tmp_path / "seed-2", tokenizer_dir, TINY_T5, seed=2)
    output = tmp_path / "out"
    job = ["--model", tiny_t5_dir, "--input", requests, "--output", output, "--rows-per-part", 4]
    assert rerank(*job, "--ensemble", second) == 0
    reference = pq.read_table(output)
    (output / "part-00002.parquet").unlink()
    caplog.clear()
    assert rerank(*job, "--resume") == 2
    assert "written with 1 --ensemble model(s) beside the model, this run has 0" in caplog.text
    caplog.clear()
    assert rerank(*job, "--ensemble", third, "--resume") == 2
    assert f"--ensemble model 1: the output was written with the model at {second}, this run has {third}" in caplog.text
    assert not (output / "part-00002.parquet").exists()
    assert rerank(*job, "--ensemble", second, "--resume") == 0
    assert pq.read_table(output).equals(reference)


@pytest.mark.parametrize("member, field, words", [
    ("random:t5-tiny", "ensemble[0]", "random weights"),
    ("instructrec-tests/not-cached", "ensemble[0]", "is not in the Hugging Face cache"),
])
def test_a_bad_ensemble_model_is_refused_before_the_output_folder(offline_hf_home, tiny_t5_dir, tmp_path, member,
                                                                   field, words):
    requests = write_requests(tmp_path / "requests.parquet")
    settings = EngineSettings(dtype="float32")
    with pytest.raises(InputError) as caught:
        JobModel.resolve(tiny_t5_dir, settings, ensemble=(member,))
    assert caught.value.field == field and words in str(caught.value)
    assert rerank("--model", tiny_t5_dir, "--ensemble", member, "--input", requests, "--output", tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()

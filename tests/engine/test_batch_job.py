"""The batch job end to end on the real engine with a tiny random T5: bad rows, directory and
multi-row-group input, empty input, schema errors before any work, output-folder rules."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.engine import Reranker, Request
from instructrec.engine.batch import (
    DUPLICATE_REQUEST_ID, MISSING_REQUEST_ID, OUTPUT_SCHEMA, InputSchemaError, JobOutputError, run_job,
    run_job_with_reranker,
)

# The engine's dtype="auto" may pick bf16 on this CPU: the references below are fp32.
FP32 = dict(dtype="float32", progress=False)

INPUT_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("candidates", pa.list_(pa.string())), ("candidate_ids", pa.list_(pa.string())),
    ("instruction", pa.string()), ("history", pa.list_(pa.string())), ("preference", pa.string()),
    ("intention", pa.string()), ("intention_kind", pa.string()), ("context", pa.string()), ("template", pa.string()),
])

# (request_id, row overrides, expected error kind, expected text in the message); None kind = ranked.
BAD_ROWS = [
    ("no-candidates", {"candidates": []}, "invalid_input", "candidates: empty candidate list"),
    ("null-candidates", {"candidates": None}, "invalid_input", "candidates: empty candidate list"),
    ("null-title", {"candidates": ["Mario Kart", None]}, "invalid_input", "candidates[1]: null or empty title"),
    ("empty-title", {"candidates": ["", "Tetris"]}, "invalid_input", "candidates[0]: null or empty title"),
    ("duplicate-candidate-ids", {"candidates": ["A game", "B game"], "candidate_ids": ["x", "x"]},
     "invalid_input", "candidate_ids: duplicate id 'x'"),
    ("ids-length-mismatch", {"candidates": ["A game", "B game"], "candidate_ids": ["x"]},
     "invalid_input", "candidate_ids: 1 ids for 2 candidates"),
    ("unknown-template", {"instruction": None, "history": ["Halo"], "template": "no-such-template"},
     "unknown_template", "no-such-template"),
    ("over-budget", {"instruction": "tell me about racing games " * 200}, "over_budget", "over the budget of 512"),
    (None, {}, MISSING_REQUEST_ID, "request_id: is null"),
    ("", {}, MISSING_REQUEST_ID, "request_id: is empty"),
]


def good_row(i: int) -> dict:
    row = {name: None for name in INPUT_SCHEMA.names}
    n = 2 + i % 4
    row.update(request_id=f"good-{i}", candidates=[f"racing game {i} edition {j}" for j in range(n)])
    if i % 3 == 0:
        row.update(history=[f"old game {i}", "Forza"], intention="a gift for my son", intention_kind="vague",
                   template="pers-search-01" if i % 2 else None)
    else:
        row.update(instruction=f"Recommend a game to a fan of puzzle number {i}. Candidates: {{candidates}}",
                   candidate_ids=[f"item-{i}-{j}" for j in range(n)] if i % 2 else None)
    return row


def mixed_rows() -> tuple[list[dict], dict[int, tuple]]:
    """Good rows with every bad kind spread among them, and two rows sharing an id.
    Returns the rows and {position: (error kind, text in the message)} of the bad ones."""
    rows, expected_errors = [], {}
    bad = iter(BAD_ROWS)
    for i in range(30):
        rows.append(good_row(i))
        if i % 3 == 1 and (spec := next(bad, None)) is not None:
            request_id, overrides, kind, text = spec
            expected_errors[len(rows)] = (kind, text)
            rows.append({**good_row(100 + i), "request_id": request_id, **overrides})
    for position in (5, 20):  # the same id twice: both occurrences are rejected
        expected_errors = {(p + 1 if p >= position else p): e for p, e in expected_errors.items()}
        expected_errors[position] = (DUPLICATE_REQUEST_ID, "'shared-id' occurs 2 times in the input")
        rows.insert(position, {**good_row(200 + position), "request_id": "shared-id"})
    return rows, expected_errors


def write_rows(path, rows, row_group_size=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), path, row_group_size=row_group_size)


def request_of(row: dict) -> Request:
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in row.items()}
    fields["candidates"] = fields["candidates"] or ()
    return Request(**fields)


def rerank_cli(model, input_path, output, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instructrec", "rerank", "--model", str(model), "--input",
                           str(input_path), "--output", str(output), *extra],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reranker(tiny_t5_dir):
    return Reranker.from_pretrained(tiny_t5_dir, dtype="float32")


def test_every_bad_row_becomes_an_error_row_in_order_and_scores_equal_rank(tiny_t5_dir, reranker, tmp_path):
    rows, expected_errors = mixed_rows()
    assert {kind for kind, _ in expected_errors.values()} == {
        "invalid_input", "unknown_template", "over_budget", MISSING_REQUEST_ID, DUPLICATE_REQUEST_ID}
    folder = tmp_path / "requests"
    folder.mkdir()
    # A folder of two files, several row groups each; parts and chunks cut across both.
    write_rows(folder / "b.parquet", rows[17:], row_group_size=6)
    write_rows(folder / "a.parquet", rows[:17], row_group_size=5)

    summary = run_job(tiny_t5_dir, folder, tmp_path / "out", rows_per_part=7, chunk_rows=4, **FP32)

    out = pq.read_table(tmp_path / "out")
    assert out.schema == OUTPUT_SCHEMA
    assert out.column("request_id").to_pylist() == [r["request_id"] for r in rows]
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == [f"part-{i:05d}.parquet" for i in range(6)]

    # The reference: Reranker.rank on the same requests in one call (ids unique for it).
    eligible = [i for i, r in enumerate(rows) if r["request_id"] and r["request_id"] != "shared-id"]
    reference = dict(zip(eligible, reranker.rank([request_of(rows[i]) for i in eligible], errors="return")))
    for position, got in enumerate(out.to_pylist()):
        assert got["n_candidates"] == len(rows[position]["candidates"] or [])
        if position in expected_errors:
            kind, text = expected_errors[position]
            assert got["error_kind"] == kind and text in got["error"], (position, got)
            assert got["ranked_ids"] == [] and got["scores"] == []
            if position in reference:  # engine-rejected rows carry the engine's own message
                assert got["error"] == reference[position].error
            continue
        want = reference[position]
        assert got["error"] is None and got["error_kind"] is None, (position, got)
        assert got["ranked_ids"] == want.ranked_ids
        # Chunks of 4 vs one call make different batch shapes, so float32 matmuls sum in another
        # order: measured differences ~1e-7 relative. Same requests, same function.
        np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-6)

    ok_rows = len(rows) - len(expected_errors)
    assert summary["rows"] == len(rows) and summary["ok"] == ok_rows
    assert summary["errors_by_kind"] == {
        "duplicate_request_id": 2, "invalid_input": 6, "missing_request_id": 2, "over_budget": 1,
        "unknown_template": 1}
    assert summary["candidates"] == sum(len(r["candidates"] or []) for r in rows)
    assert summary["parts_written"] == 6 and summary["parts_skipped"] == 0
    assert json.loads((tmp_path / "out" / "_summary.json").read_text()) == summary


def test_empty_input_gives_an_empty_valid_output(tiny_t5_dir, tmp_path):
    write_rows(tmp_path / "empty.parquet", [])
    summary = run_job(tiny_t5_dir, tmp_path / "empty.parquet", tmp_path / "out", **FP32)
    out = pq.read_table(tmp_path / "out")
    assert out.num_rows == 0 and out.schema == OUTPUT_SCHEMA
    assert [p.name for p in (tmp_path / "out").glob("part-*")] == ["part-00000.parquet"]
    assert summary["rows"] == 0 and summary["parts_written"] == 1 and summary["errors_by_kind"] == {}


def test_schema_error_stops_the_cli_before_any_work(tiny_t5_dir, tmp_path):
    pq.write_table(pa.table({"request_id": ["a"], "candidates": ["not a list"]}), tmp_path / "in.parquet")
    with pytest.raises(InputSchemaError, match="column 'candidates' must be list<string> but is string"):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "api-out")
    assert not (tmp_path / "api-out").exists()

    done = rerank_cli(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "cli-out", "--dtype", "float32")
    assert done.returncode == 2, done.stderr
    assert "column 'candidates' must be list<string> but is string in in.parquet" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cli-out").exists()


def test_existing_output_is_never_overwritten_and_resume_refuses_another_run(tiny_t5_dir, tmp_path):
    rows = [good_row(i) for i in range(6)]
    write_rows(tmp_path / "in.parquet", rows)
    run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=4, **FP32)
    first = pq.read_table(tmp_path / "out")

    with pytest.raises(JobOutputError, match="is not empty .* Pass --resume .* or choose a new --output"):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=4, **FP32)
    with pytest.raises(JobOutputError, match="incompatible run; it differs in rows_per_part: was 4, now 3"):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=3, resume=True, **FP32)
    with pytest.raises(JobOutputError, match="options.group_size: was 10, now 5"):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=4, group_size=5,
                resume=True, **FP32)
    write_rows(tmp_path / "in.parquet", rows[:5])  # the input changed since
    with pytest.raises(JobOutputError, match="input.files"):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=4, resume=True, **FP32)
    assert pq.read_table(tmp_path / "out").equals(first)  # nothing was touched

    # A finished run resumed again with the same input: nothing to do, same output.
    write_rows(tmp_path / "in2.parquet", rows)
    run_job(tiny_t5_dir, tmp_path / "in2.parquet", tmp_path / "out2", rows_per_part=4, **FP32)
    summary = run_job(tiny_t5_dir, tmp_path / "in2.parquet", tmp_path / "out2", rows_per_part=4, resume=True,
                      **FP32)
    assert summary["parts_skipped"] == 2 and summary["parts_written"] == 0 and summary["rows"] == 6
    assert pq.read_table(tmp_path / "out2").equals(first)


def test_output_folder_not_written_by_the_job_is_refused_on_resume(tiny_t5_dir, tmp_path):
    write_rows(tmp_path / "in.parquet", [good_row(0)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(JobOutputError, match="has no _job.json but holds \\['notes.txt'\\]"):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", resume=True, **FP32)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("normalize", ["mean", "calibrated", "calibrated:-0.5"])
def test_normalize_ranks_by_the_score_form_rank_gives_and_resume_keeps_it(tiny_t5_dir, reranker, tmp_path,
                                                                           normalize):
    rows = [good_row(i) for i in range(9)]
    rows[4]["candidates"] = ["racing game 4 edition 0", "a much longer racing game title with many more tokens"]
    write_rows(tmp_path / "in.parquet", rows)
    summary = run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", normalize=normalize,
                      rows_per_part=4, **FP32)
    out = pq.read_table(tmp_path / "out").to_pylist()
    reference = reranker.rank([request_of(r) for r in rows], normalize=normalize)
    summed = reranker.rank([request_of(r) for r in rows])
    for got, want, plain in zip(out, reference, summed):
        assert got["error"] is None and got["ranked_ids"] == list(want.ranked_ids)
        # The job packs parts of 4 rows, the reference all 9 at once: other fp32 matmul shapes sum in
        # another order (3e-6 relative seen, with the generated tokenizer of tests/conftest.py).
        np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)
    # The form changed the scores: this is not the default sum under another name.
    assert any(not np.allclose(got["scores"], plain.scores, atol=1e-3) for got, plain in zip(out, summed))
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["options"]["normalize"] == normalize
    assert summary["ok"] == 9

    with pytest.raises(JobOutputError, match=f'options.normalize: was "{normalize}", now "sum"'):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=4, resume=True, **FP32)


def test_a_callers_reranker_ranks_by_the_score_form_and_resume_compares_its_options(reranker, tmp_path):
    rows = [good_row(i) for i in range(5)]
    write_rows(tmp_path / "in.parquet", rows)
    options = {"model": "tiny", "dtype": "float32"}
    summary = run_job_with_reranker(reranker, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=2,
                                    progress=False, options=options, normalize="calibrated:0.5")
    out = pq.read_table(tmp_path / "out").to_pylist()
    reference = reranker.rank([request_of(r) for r in rows], normalize="calibrated:0.5")
    for got, want in zip(out, reference):
        assert got["error"] is None and got["ranked_ids"] == list(want.ranked_ids)
        np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)  # as above: other packing
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["options"] == {**options,
                                                                                  "normalize": "calibrated:0.5"}
    assert summary["ok"] == 5
    with pytest.raises(JobOutputError, match='options.normalize: was "calibrated:0.5", now "sum"'):
        run_job_with_reranker(reranker, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=2,
                              progress=False, options=options, resume=True)
    with pytest.raises(JobOutputError, match="options.model"):
        run_job_with_reranker(reranker, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=2, progress=False,
                              options={**options, "model": "other"}, resume=True, normalize="calibrated:0.5")


def test_an_output_written_before_normalize_existed_resumes_with_the_sum(tiny_t5_dir, tmp_path):
    rows = [good_row(i) for i in range(6)]
    write_rows(tmp_path / "in.parquet", rows)
    run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=4, **FP32)
    manifest_path = tmp_path / "out" / "_job.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["options"]["normalize"]  # as the job wrote it before the option existed
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "out" / "_commit-00001.json").unlink()
    with pytest.raises(JobOutputError, match='options.normalize: was "sum", now "calibrated"'):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=4, resume=True,
                normalize="calibrated", **FP32)
    summary = run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", rows_per_part=4, resume=True, **FP32)
    assert summary["parts_written"] == 1 and summary["rows"] == 6


def test_an_unknown_score_form_is_refused_before_any_work(tiny_t5_dir, tmp_path):
    from instructrec.engine.errors import InputError

    write_rows(tmp_path / "in.parquet", [good_row(0)])
    with pytest.raises(InputError, match="normalize: unknown score form 'pmi'.*sum, mean, calibrated"):
        run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", normalize="pmi", **FP32)
    assert not (tmp_path / "out").exists()
    done = rerank_cli(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "cli-out", "--normalize", "calibrated:half")
    assert done.returncode == 2, done.stderr
    assert "--normalize: 'calibrated:half': the prior weight 'half' is not a number" in done.stderr, done.stderr
    assert not (tmp_path / "cli-out").exists()


def test_a_candidate_priors_column_is_fused_by_a_priors_form_and_checked_per_row(tiny_t5_dir, reranker, tmp_path):
    rows = [good_row(i) for i in range(6)]
    for i, row in enumerate(rows):
        row["candidate_priors"] = [float((j * (i + 2)) % 5) for j in range(len(row["candidates"]))]
    rows[2]["candidate_priors"] = None  # none for a form that fuses them: an error row
    rows[4]["candidate_priors"][0] = None  # a null entry: an error row naming it
    schema = INPUT_SCHEMA.append(pa.field("candidate_priors", pa.list_(pa.float64())))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "in.parquet")
    summary = run_job(tiny_t5_dir, tmp_path / "in.parquet", tmp_path / "out", normalize="mean+priors:2", **FP32)
    out = pq.read_table(tmp_path / "out").to_pylist()
    reference = reranker.rank([request_of(r) for r in rows], errors="return", normalize="mean+priors:2")
    for got, want in zip(out, reference):
        assert got["error"] == want.error and got["ranked_ids"] == want.ranked_ids
        np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)
    assert out[2]["error"].startswith("candidate_priors: the score form 'mean+priors:2' fuses candidate priors")
    assert out[4]["error"].startswith("candidate_priors[0]: must be a number, got NoneType None")
    assert summary["ok"] == 4 and summary["errors_by_kind"] == {"invalid_input": 2}
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["options"]["normalize"] == "mean+priors:2"

    # Whole numbers (interaction counts) are numbers too: the same ranking as their float column.
    whole = [dict(r, candidate_priors=None if r["candidate_priors"] is None or None in r["candidate_priors"]
                  else [int(v) for v in r["candidate_priors"]]) for r in rows]
    pq.write_table(pa.Table.from_pylist(whole, schema=INPUT_SCHEMA.append(
        pa.field("candidate_priors", pa.list_(pa.int64())))), tmp_path / "whole.parquet")
    run_job(tiny_t5_dir, tmp_path / "whole.parquet", tmp_path / "whole-out", normalize="mean+priors:2", **FP32)
    assert [r["ranked_ids"] for r in pq.read_table(tmp_path / "whole-out").to_pylist()] == [
        r["ranked_ids"] for r in out]

    # Text where numbers belong is a schema error, before any work.
    pq.write_table(pa.Table.from_pylist([dict(rows[0], candidate_priors=["1", "2"])], schema=INPUT_SCHEMA.append(
        pa.field("candidate_priors", pa.list_(pa.string())))), tmp_path / "text.parquet")
    with pytest.raises(InputSchemaError, match="column 'candidate_priors' must be list<double> but is list<element: string>"):
        run_job(tiny_t5_dir, tmp_path / "text.parquet", tmp_path / "text-out", **FP32)
    assert not (tmp_path / "text-out").exists()


def test_a_priors_form_over_input_without_the_column_is_refused_before_any_work(tiny_t5_dir, reranker, tmp_path):
    folder = tmp_path / "requests"
    folder.mkdir()
    write_rows(folder / "a.parquet", [good_row(0)])  # no candidate_priors column
    with_priors = dict(good_row(1), candidate_priors=[1.0, 2.0, 3.0])
    pq.write_table(pa.Table.from_pylist([with_priors], schema=INPUT_SCHEMA.append(
        pa.field("candidate_priors", pa.list_(pa.float64())))), folder / "b.parquet")
    message = "column 'candidate_priors' is missing from a.parquet, and --normalize sum+priors:1 fuses it"
    with pytest.raises(InputSchemaError, match=re.escape(message)) as caught:
        run_job(tiny_t5_dir, folder, tmp_path / "out", normalize="sum+priors:1", **FP32)
    assert "b.parquet" not in str(caught.value)
    with pytest.raises(InputSchemaError, match=re.escape(message)):
        run_job_with_reranker(reranker, folder, tmp_path / "out", normalize="sum+priors:1", progress=False)
    assert not (tmp_path / "out").exists()
    done = rerank_cli(tiny_t5_dir, folder, tmp_path / "cli-out", "--dtype", "float32", "--normalize", "sum+priors:1")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cli-out").exists()
    # Without +priors the column is not needed.
    assert run_job(tiny_t5_dir, folder, tmp_path / "plain", normalize="sum", **FP32)["ok"] == 2


def test_a_chunk_across_files_written_with_different_types_and_columns_ranks_every_row(
        tiny_t5_dir, reranker, tmp_path):
    """Files of one input folder may each be valid in their own way: large_string or dictionary
    strings, list views, an optional column only some hold, whole-number priors. A chunk spanning
    them is one table with every row intact (pyarrow 26 concatenates none of these as they are)."""
    rows = [good_row(i) for i in range(9)]
    for row in rows:
        row["candidate_priors"] = [float(j % 3) for j in range(len(row["candidates"]))]
    folder = tmp_path / "requests"
    folder.mkdir()
    plain = pa.Table.from_pylist(rows[:3], schema=INPUT_SCHEMA.append(
        pa.field("candidate_priors", pa.list_(pa.float64()))))
    pq.write_table(plain, folder / "a.parquet")
    second = pa.Table.from_pylist(rows[3:6], schema=INPUT_SCHEMA)  # no candidate_priors column
    second = second.set_column(0, "request_id", second["request_id"].cast(pa.large_string()))
    second = second.set_column(3, "instruction", second["instruction"].dictionary_encode())
    pq.write_table(second.drop_columns(["preference", "context"]), folder / "b.parquet")
    third = pa.table({
        "request_id": [r["request_id"] for r in rows[6:]],
        "candidates": pa.array([r["candidates"] for r in rows[6:]], pa.list_view(pa.string())),
        "candidate_ids": pa.array([r["candidate_ids"] for r in rows[6:]], pa.large_list(pa.string())),
        "instruction": [r["instruction"] for r in rows[6:]],
        "history": pa.array([r["history"] for r in rows[6:]], pa.large_list_view(pa.string())),
        "preference": pa.array([None] * 3, pa.null()),
        "intention": [r["intention"] for r in rows[6:]], "intention_kind": [r["intention_kind"] for r in rows[6:]],
        "template": [r["template"] for r in rows[6:]],
        "candidate_priors": pa.array([[int(v) for v in r["candidate_priors"]] for r in rows[6:]], pa.list_(pa.int64())),
    })
    pq.write_table(third, folder / "c.parquet")

    summary = run_job(tiny_t5_dir, folder, tmp_path / "out", chunk_rows=4, rows_per_part=9, **FP32)
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert summary["ok"] == 9 and [r["request_id"] for r in out] == [r["request_id"] for r in rows]
    reference = reranker.rank([request_of(r) for r in rows])
    for got, want in zip(out, reference):
        assert got["error"] is None and got["ranked_ids"] == list(want.ranked_ids)
        np.testing.assert_allclose(got["scores"], want.scores, rtol=1e-5, atol=1e-5)
    assert [r["n_candidates"] for r in out] == [len(r["candidates"]) for r in rows]

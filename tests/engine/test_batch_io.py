"""The batch job's I/O layer without a model: schema checks, input discovery, reading by row
groups, unique request ids, row -> Request and result -> Arrow conversion."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.engine.batch import (
    DUPLICATE_REQUEST_ID, MISSING_REQUEST_ID, OUTPUT_SCHEMA, InputSchemaError, RequestIdSet, RowError,
    find_duplicate_request_ids, iter_record_batches, results_to_record_batch, rows_to_requests, scan_input,
)
from instructrec.engine.errors import InputError
from instructrec.engine.types import RankedResult, Request


def write_requests(path, n, start=0, row_group_size=None, **extra_columns):
    table = pa.table({
        "request_id": [f"r{start + i}" for i in range(n)],
        "candidates": [[f"title {start + i} {j}" for j in range(3)] for i in range(n)],
        **extra_columns,
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# --- schema -----------------------------------------------------------------------------------


def test_missing_required_column_names_it_and_the_expected_type(tmp_path):
    pq.write_table(pa.table({"request_id": ["a"]}), tmp_path / "in.parquet")
    with pytest.raises(InputSchemaError) as info:
        scan_input(tmp_path / "in.parquet")
    assert info.value.field == "candidates"
    assert "'candidates' is missing from in.parquet (expected list<string>)" in str(info.value)
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize("column, values, expected", [
    ("candidates", [1], "list<string>"),
    ("candidates", [[1, 2]], "list<string>"),
    ("request_id", [7], "string"),
    ("candidate_ids", [[1]], "list<string>"),
    ("history", ["not a list"], "list<string>"),
    ("template", [3], "string"),
])
def test_wrong_type_names_column_expected_and_actual(tmp_path, column, values, expected):
    data = {"request_id": ["a"], "candidates": [["x"]]}
    data[column] = values
    table = pa.table(data)
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(InputSchemaError) as info:
        scan_input(tmp_path / "in.parquet")
    stored_type = pq.read_schema(tmp_path / "in.parquet").field(column).type
    assert f"column {column!r} must be {expected} but is {stored_type} in in.parquet" in str(info.value)
    assert info.value.field == column


def test_every_problem_of_every_file_is_listed_once(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"request_id": [1]}), folder / "a.parquet")
    pq.write_table(pa.table({"candidates": [["x"]], "intention": [2.0]}), folder / "b.parquet")
    with pytest.raises(InputSchemaError) as info:
        scan_input(folder)
    assert info.value.problems == [
        ("request_id", "must be string but is int64 in a.parquet"),
        ("candidates", "is missing from a.parquet (expected list<string>)"),
        ("request_id", "is missing from b.parquet (expected string)"),
        ("intention", "must be string but is double in b.parquet"),
    ]


def test_null_typed_optional_columns_large_and_dictionary_strings_are_accepted(tmp_path):
    table = pa.table({
        "request_id": pa.array(["a", "b"], pa.large_string()),
        "candidates": pa.array([["x"], []], pa.large_list(pa.string())),
        "instruction": pa.array([None, None], pa.null()),
        "template": pa.array(["t", "t"]).dictionary_encode(),
        "user_segment": [1, 2],  # not in the contract: ignored
    })
    pq.write_table(table, tmp_path / "in.parquet")
    job_input = scan_input(tmp_path / "in.parquet")
    assert job_input.rows == 2
    assert job_input.files[0].columns == ("request_id", "candidates", "instruction", "template")


def test_directory_input_is_sorted_and_skips_bookkeeping_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_requests(folder / "b.parquet", 2, start=10)
    write_requests(folder / "a.parquet", 3)
    (folder / "_SUCCESS").write_text("")
    (folder / ".a.parquet.crc").write_text("")
    write_requests(folder / "_metadata_like.parquet", 1)
    job_input = scan_input(folder)
    assert [f.name for f in job_input.files] == ["a.parquet", "b.parquet"]
    ids = [r for _, b in iter_record_batches(job_input, ["request_id"]) for r in b.column(0).to_pylist()]
    assert ids == ["r0", "r1", "r2", "r10", "r11"]


def test_empty_folder_and_missing_path_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="holds no \\*.parquet file"):
        scan_input(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        scan_input(tmp_path / "nope.parquet")


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet is not a readable Parquet file"):
        scan_input(tmp_path)


def test_reading_goes_by_row_group_with_global_offsets_and_skips(tmp_path):
    write_requests(tmp_path / "a.parquet", 10, row_group_size=4)  # groups of 4, 4, 2
    write_requests(tmp_path / "b.parquet", 5, start=10, row_group_size=5)
    job_input = scan_input(tmp_path)
    assert [f.row_group_rows for f in job_input.files] == [(4, 4, 2), (5,)]
    got = [(start, batch.num_rows) for start, batch in iter_record_batches(job_input, batch_rows=3)]
    assert got == [(0, 3), (3, 1), (4, 3), (7, 1), (8, 2), (10, 3), (13, 2)]
    skipped = [(start, batch.column("request_id")[0].as_py())
               for start, batch in iter_record_batches(job_input, skip=lambda a, b: b <= 8)]
    assert skipped == [(8, "r8"), (10, "r10")]


# --- unique request ids -----------------------------------------------------------------------


def test_request_id_set_agrees_with_a_python_set_across_merges():
    rng = random.Random(3)
    ids = [f"user-{rng.randrange(3000)}" for _ in range(5000)]
    compact = RequestIdSet(merge_every=97)  # many merges into the sorted arrays
    reference, expected, got = set(), [], []
    for start in range(0, len(ids), 211):
        chunk = ids[start:start + 211]
        got += compact.add_many(chunk)
        for request_id in chunk:
            expected.append(request_id in reference)
            reference.add(request_id)
    assert got == expected
    assert len(compact) == len(reference)


def test_duplicates_are_counted_across_files(tmp_path):
    pq.write_table(pa.table({"request_id": ["a", "b", None, "", "a"], "candidates": [["x"]] * 5}),
                   tmp_path / "1.parquet")
    pq.write_table(pa.table({"request_id": ["c", "a", "b"], "candidates": [["x"]] * 3}), tmp_path / "2.parquet")
    assert find_duplicate_request_ids(scan_input(tmp_path)) == {"a": 3, "b": 2}


# --- rows -> requests, results -> Arrow -------------------------------------------------------


def test_rows_become_requests_with_every_field_and_job_errors():
    batch = pa.RecordBatch.from_pydict({
        "request_id": ["ok", None, "", "dup", "nulls"],
        "candidates": [["A", "B"], ["A"], [], ["A", "B", "C"], None],
        "candidate_ids": [["a", "b"], None, None, None, None],
        "history": [["h1", "h2"], None, None, None, None],
        "preference": ["likes A", None, None, None, None],
        "intention": ["a gift", None, None, None, None],
        "intention_kind": ["vague", None, None, None, None],
        "context": ["at night", None, None, None, None],
        "template": ["T1", None, None, None, None],
    })
    rows = rows_to_requests(batch, {"dup": 2})
    assert rows[0] == Request(request_id="ok", candidates=("A", "B"), candidate_ids=("a", "b"),
                              history=("h1", "h2"), preference="likes A", intention="a gift",
                              intention_kind="vague", context="at night", template="T1")
    assert rows[1].error_kind == MISSING_REQUEST_ID and "request_id: is null" in rows[1].error
    assert rows[2].error_kind == MISSING_REQUEST_ID and "request_id: is empty" in rows[2].error
    assert rows[3] == RowError("dup", 3, rows[3].error, DUPLICATE_REQUEST_ID)
    assert "'dup' occurs 2 times" in rows[3].error
    # A null candidates list goes to the engine as "no candidates", so its message is the engine's.
    assert rows[4] == Request(request_id="nulls", candidates=())


def test_results_become_output_rows_with_empty_lists_on_error():
    results = [
        RankedResult("a", ["2", "0", "1"], [-1.5, -2.0, -7.25], 3),
        RankedResult("b", [], [], 0, "candidates: empty", "invalid_input"),
        RowError(None, 2, "request_id: is null", MISSING_REQUEST_ID),
    ]
    batch = results_to_record_batch(results)
    assert batch.schema == OUTPUT_SCHEMA
    assert batch.to_pylist() == [
        {"request_id": "a", "ranked_ids": ["2", "0", "1"], "scores": [-1.5, -2.0, -7.25], "error": None,
         "n_candidates": 3, "error_kind": None},
        {"request_id": "b", "ranked_ids": [], "scores": [], "error": "candidates: empty", "n_candidates": 0,
         "error_kind": "invalid_input"},
        {"request_id": None, "ranked_ids": [], "scores": [], "error": "request_id: is null", "n_candidates": 2,
         "error_kind": MISSING_REQUEST_ID},
    ]
    assert results_to_record_batch([]).num_rows == 0


def test_canonical_batch_gives_one_schema_and_keeps_every_value():
    from instructrec.engine.job_input import canonical_batch

    batch = pa.RecordBatch.from_pydict({
        "request_id": pa.array(["a", "b"]).dictionary_encode(),
        # pyarrow 26 casts this list view to [["x", "y"], []]: the second list would be lost.
        "candidates": pa.array([["x", "y"], ["z"]], pa.list_view(pa.string())),
        "candidate_priors": pa.array([[1, 2], [3]], pa.list_(pa.int32())),
        "not_a_contract_column": [1, 2],
    })
    out = canonical_batch(batch, ["request_id", "candidates", "history", "candidate_priors"])
    assert out.schema == pa.schema([("request_id", pa.string()), ("candidates", pa.list_(pa.string())),
                                    ("history", pa.list_(pa.string())), ("candidate_priors", pa.list_(pa.float64()))])
    assert out.to_pydict() == {"request_id": ["a", "b"], "candidates": [["x", "y"], ["z"]], "history": [None, None],
                               "candidate_priors": [[1.0, 2.0], [3.0]]}

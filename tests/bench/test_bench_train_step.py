"""`python -m instructrec.bench.train_step`: the before/after table of the training step. The
variants differ only in how the loss is computed and batched, so the first step of each, from the
same seeded weights on the same rows, must give the same loss: checked here against Hugging
Face's own loss (labels passed to its forward)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from instructrec.bench import train_step


@pytest.fixture()
def instructions(tmp_path):
    titles = ([f"Nitro Rally {i}: World Tour - PC" for i in range(1, 9)]
              + [f"Tiny Garden {i} - Xbox One" for i in range(1, 9)])
    rows = [{"instruction": "Past purchases: " + "; ".join(titles[: 1 + i % 7]) + ". What next?",
             "target": titles[(i + 1) % len(titles)]} for i in range(48)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_every_variant_is_measured_and_reported(instructions, tokenizer_dir, tmp_path, capsys):
    report = tmp_path / "steps.json"
    assert train_step.main(["--instructions", str(instructions), "--tokenizer", str(tokenizer_dir),
                            "--shapes", "t5-tiny", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                            "--threads", "1", "--in-process", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(report.read_text())["results"]
    names = [r["variant"] for r in results]
    from instructrec.engine.capabilities import auto_dtype_name

    # The bf16 rows (bf16 autocast, shape buckets) run only where the CPU has native bf16.
    bf16_rows = ["+ shape buckets"] if auto_dtype_name("cpu") == "bfloat16" else []
    assert names[:2] == ["plain", "+ length-grouped"]
    assert names[-5 - len(bf16_rows):] == (["+ real-token head", "+ fused AdamW"] + bf16_rows
                                            + ["+ compact vocabulary", "+ fused GELU", "+ fused RMS norm"])
    assert "+ shape buckets" in printed and "compact vocabulary of the whole file" in printed
    assert all(r["rows_per_s"] > 0 and r["steps"] == 2 for r in results)
    assert results[0]["ratio"] == 1.0
    assert "+ bf16 autocast" in printed  # measured, or skipped with the reason
    assert "CPU: " in printed


def test_too_few_rows_for_the_steps_are_refused_before_any_variant_runs(instructions, tokenizer_dir, capsys):
    # 48 rows in batches of 4 are 12 batches; the default 40 + 200 steps need 240.
    with pytest.raises(SystemExit) as exit_info:
        train_step.main(["--instructions", str(instructions), "--tokenizer", str(tokenizer_dir),
                         "--shapes", "t5-tiny", "--batch-size", "4", "--threads", "1", "--in-process"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "48 rows make 12 batches of 4, fewer than --warmup + --steps = 240" in err
    assert "raise --max-rows (the file has 48) or lower --steps" in err


def test_a_variant_measured_in_a_fresh_process_reports_its_steps(instructions, tokenizer_dir):
    from transformers import AutoTokenizer

    from instructrec.training.tune_data import tokenize_rows

    table = pq.read_table(instructions)
    rows = tokenize_rows(AutoTokenizer.from_pretrained(tokenizer_dir), table.column("instruction").to_pylist(),
                         table.column("target").to_pylist(), 512, 64, "train")
    r = train_step.measure_in_fresh_process(rows, "t5-tiny", head=True, grouped=True, bf16=False, batch_size=4,
                                            steps=2, warmup=1, fused=True, multiple=16, threads=1)
    assert r["steps"] == 2 and r["rows_per_s"] > 0 and r["rows_per_cpu_s"] > 0


def test_the_real_token_head_computes_hugging_faces_loss(instructions, tokenizer_dir):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from instructrec.engine.presets import shape_config
    from instructrec.training.tune_data import collate, tokenize_rows
    from instructrec.training.tune_model import install_hidden_states_head, sequence_nll_sum

    table = pq.read_table(instructions)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = tokenize_rows(tokenizer, table.column("instruction").to_pylist(), table.column("target").to_pylist(),
                         512, 64, "train")
    config = shape_config("t5-tiny")
    config.pop("model_type")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**config)).eval()
    input_ids, attention, decoder_ids, labels = collate(rows, list(range(6)), 0, 0, "cpu")
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss  # HF's mean NLL
        head = install_hidden_states_head(model)
        ours = sequence_nll_sum(model, input_ids, attention, decoder_ids, labels, head=head) / (labels != -100).sum()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_chosen_variants_interleaved_over_rounds_report_medians_and_per_round_ratios(instructions, tokenizer_dir,
                                                                                    tmp_path, capsys):
    report = tmp_path / "rounds.json"
    assert train_step.main(["--instructions", str(instructions), "--tokenizer", str(tokenizer_dir),
                            "--shapes", "t5-tiny", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                            "--threads", "1", "--in-process", "--variants", "head,fused-gelu", "--rounds", "3",
                            "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(report.read_text())["results"]
    # Interleaved: each round measures both variants, in the order given.
    assert [(r["round"], r["key"]) for r in results] == [(1, "head"), (1, "fused-gelu"), (2, "head"),
                                                         (2, "fused-gelu"), (3, "head"), (3, "fused-gelu")]
    # Each ratio is against the first variant of its own round.
    for first, second in zip(results[::2], results[1::2]):
        assert first["ratio"] == 1.0
        assert second["ratio"] == pytest.approx(second["rows_per_cpu_s"] / first["rows_per_cpu_s"])
    speeds = sorted(r["rows_per_s"] for r in results if r["key"] == "fused-gelu")
    ratio = sorted(r["ratio"] for r in results if r["key"] == "fused-gelu")[1]
    row = next(line for line in printed.splitlines() if line.startswith("| t5-tiny | + fused GELU |"))
    assert row == (f"| t5-tiny | + fused GELU | 4 | {speeds[1]:.1f}; {speeds[0]:.1f}-{speeds[2]:.1f} | "
                   f"{sorted(r['rows_per_cpu_s'] for r in results if r['key'] == 'fused-gelu')[1]:.1f} | "
                   f"{ratio:.2f} |")
    assert "x + real-token head (rows/CPU-s, median of rounds)" in printed
    assert "| plain |" not in printed


def test_cells_across_shapes_and_batch_sizes_interleave_and_compare_with_the_first_cell(
        instructions, tokenizer_dir, tmp_path, capsys):
    report = tmp_path / "cells.json"
    assert train_step.main(["--instructions", str(instructions), "--tokenizer", str(tokenizer_dir),
                            "--batch-size", "4", "--steps", "2", "--warmup", "1", "--threads", "1", "--in-process",
                            "--cells", "t5-micro:grouped,t5-tiny:fused-norm,t5-tiny:fused-norm@8", "--rounds", "2",
                            "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(report.read_text())["results"]
    # Every cell once per round, in the order given, shapes and batch sizes interleaved.
    assert [(r["round"], r["shape"], r["key"], r["batch_size"]) for r in results] == [
        (n, shape, key, batch) for n in (1, 2)
        for shape, key, batch in (("t5-micro", "grouped", 4), ("t5-tiny", "fused-norm", 4), ("t5-tiny", "fused-norm", 8))]
    # A batch of 8 steps over twice the rows of a batch of 4.
    assert [r["steps"] for r in results] == [2] * 6
    for round_results in (results[:3], results[3:]):
        first = round_results[0]["rows_per_cpu_s"]
        assert [r["ratio"] for r in round_results] == pytest.approx([r["rows_per_cpu_s"] / first for r in round_results])
    assert "x t5-micro + length-grouped @4 (rows/CPU-s, median of rounds)" in printed
    assert sum(line.startswith("| t5-tiny | + fused RMS norm | 8 |") for line in printed.splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--cells", "t5-tiny:plain,t5-tiny"], "--cells: 't5-tiny' is not SHAPE:KEY[@BATCH]"),
    (["--cells", "t5-huge:plain"], "--cells: 't5-huge:plain' is not SHAPE:KEY[@BATCH]"),
    (["--cells", "t5-tiny:plain@0"], "the batch after @ must be a whole number >= 1"),
    (["--cells", "t5-tiny:plain,t5-tiny:plain@4"], "names a cell twice"),
    (["--cells", "t5-tiny:plain", "--variants", "plain"], "--cells names each shape and variant itself"),
])
def test_bad_cells_are_refused_naming_the_flag(instructions, tokenizer_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train_step.main(["--instructions", str(instructions), "--tokenizer", str(tokenizer_dir),
                         "--batch-size", "4", "--steps", "2", "--warmup", "1"] + flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--variants", "plain,fused-rms"], "--variants: unknown fused-rms"),
                                            (["--rounds", "0"], "--rounds must be at least 1")])
def test_unknown_variants_and_no_rounds_are_refused(instructions, tokenizer_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train_step.main(["--instructions", str(instructions), "--tokenizer", str(tokenizer_dir),
                         "--shapes", "t5-tiny", "--batch-size", "4", "--steps", "2", "--warmup", "1"] + flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

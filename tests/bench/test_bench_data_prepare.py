"""The data-preparation benchmark runs end to end on a tiny generated file."""

from __future__ import annotations

import json

from instructrec.bench.data_prepare import generate, main
from instructrec.training.data.formats import detect_format


def test_generated_file_is_2018_format(tmp_path):
    reviews, meta, raw_bytes = generate(tmp_path, 500)
    assert detect_format(reviews) == detect_format(meta) == "amazon2018"
    assert raw_bytes > 500 * 100


def test_benchmark_reports_throughput_and_memory(tmp_path, capsys):
    assert main(["--reviews", "3000", "--workdir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reviews"] == 3000 and report["interactions"] > 0
    for key in ("records_per_s", "records_per_cpu_s", "peak_rss_mib", "prepare_s"):
        assert report[key] > 0, key
    assert (tmp_path / "generated.json").exists()  # what --reuse reads

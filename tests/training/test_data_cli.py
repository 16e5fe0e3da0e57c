"""`instructrec data synth | prepare | stats` end to end through the real dispatcher."""

from __future__ import annotations

import json

from instructrec.cli import main
from instructrec.training.data.synth import META_FILE, REVIEWS_FILE


def test_synth_prepare_stats(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    assert main(["data", "synth", "--out", str(raw), "--users", "60", "--items", "40",
                 "--seed", "2", "--malformed"]) == 0
    assert (raw / REVIEWS_FILE).exists() and (raw / META_FILE).exists()
    capsys.readouterr()

    assert main(["data", "prepare", "--reviews", str(raw / REVIEWS_FILE), "--meta",
                 str(raw / META_FILE), "--out", str(out), "--k-core", "3", "--seed", "4",
                 "--negatives", "5", "--format", "amazon2018"]) == 0
    printed = capsys.readouterr()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["k_core"] == 3 and stats["seed"] == 4 and stats["candidates"]["negatives"] == 5
    assert f"{stats['interactions']:,}" in printed.out and "review_duplicate_pair" in printed.out
    assert "reading reviews" in printed.err  # progress on stderr
    for name in ("items", "interactions", "search_splits", "candidates"):
        assert (out / f"{name}.parquet").exists()

    assert main(["data", "stats", str(out)]) == 0
    table = capsys.readouterr().out
    assert "users" in table and f"{stats['users']:,}" in table and "malformed lines" in table
    assert main(["data", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == stats


def test_strict_and_missing_inputs_exit_2(tmp_path, capsys):
    raw = tmp_path / "raw"
    main(["data", "synth", "--out", str(raw), "--users", "30", "--items", "20", "--malformed"])
    capsys.readouterr()
    code = main(["data", "prepare", "--reviews", str(raw / REVIEWS_FILE), "--meta",
                 str(raw / META_FILE), "--out", str(tmp_path / "out"), "--strict",
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{raw / REVIEWS_FILE}:" in err and "error" in err
    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2
    assert "no stats.json" in capsys.readouterr().err

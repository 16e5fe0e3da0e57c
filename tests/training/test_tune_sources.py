"""Where `instructrec train` takes its model from, and what it says about it: a Hub id trains
exactly as its folder does and its commit is recorded; random weights are named in the training
config and the model card; a bare shape name is refused before any work; the help text shows no
default for switches; `--report-to` needs its tracker installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructrec.cli import main
from instructrec.engine.errors import InputError
from instructrec.training.tune import TrainConfig, train

from ..conftest import write_train_and_valid, TINY_HUB_COMMIT, TINY_HUB_ID

TITLES = ["Halo 3 - Xbox 360", "Mario Kart 8", "Portal 2 - PC", "Tetris Effect", "Stardew Valley", "Forza Horizon 4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instructions")
    rows = {"instruction": [f"The shopper bought {t}. What next?" for t in TITLES], "target": TITLES[1:] + TITLES[:1],
            "template": ["demo"] * len(TITLES)}
    return write_train_and_valid(folder, rows)


def config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(instructions=dataset, out=out, precision="fp32", device="cpu", progress=False, batch_size=3,
                max_steps=3, rank_eval=False, dropout=0.0, threads=1, optimizer="adamw", lr=1e-3)
    base.update(overrides)
    return TrainConfig(**base)


def test_a_hub_id_trains_exactly_as_its_folder_and_records_its_commit(dataset, tmp_path, tiny_t5_dir,
                                                                       offline_hf_home):
    by_id = train(config(dataset, tmp_path / "by-id", model=TINY_HUB_ID))
    by_folder = train(config(dataset, tmp_path / "by-folder", model=str(tiny_t5_dir)))
    assert by_id.step_losses == by_folder.step_losses and len(by_id.step_losses) == 3
    recorded = json.loads((tmp_path / "by-id" / "training_config.json").read_text())
    assert recorded["model_source"]["repo_id"] == TINY_HUB_ID
    assert recorded["model_source"]["commit"] == TINY_HUB_COMMIT
    assert recorded["weights_started_random"] is False
    card = (tmp_path / "by-id" / "README.md").read_text()
    assert TINY_HUB_COMMIT[:12] in card and "RANDOM" not in card


def test_random_weights_are_said_in_the_config_and_the_model_card(dataset, tmp_path, tokenizer_dir):
    out = tmp_path / "random"
    train(config(dataset, out, model="random:t5-tiny", tokenizer=tokenizer_dir))
    recorded = json.loads((out / "training_config.json").read_text())
    assert recorded["weights_started_random"] is True
    assert recorded["model_source"] == {"spec": "random:t5-tiny", "kind": "random", "shape": "t5-tiny"}
    assert "started from RANDOM initialisation" in (out / "README.md").read_text()


@pytest.mark.parametrize("bare, hub", [("t5-tiny", None), ("flan-t5-small", "google/flan-t5-small")])
def test_a_bare_shape_name_is_refused_before_any_work(dataset, tmp_path, tokenizer_dir, caplog, bare, hub):
    out = tmp_path / "run"
    code = main(["train", "--instructions", str(dataset), "--model", bare, "--tokenizer", str(tokenizer_dir),
                 "--out", str(out), "--max-steps", "1", "--no-progress", "--no-rank-eval", "--device", "cpu"])
    assert code == 2
    message = caplog.text  # the CLI's one error line
    assert f"random:{bare}" in message and (hub is None or hub in message)
    assert not out.exists()


def test_revision_with_a_folder_is_refused(dataset, tmp_path, tiny_t5_dir):
    with pytest.raises(InputError, match="revision"):
        train(config(dataset, tmp_path / "run", model=str(tiny_t5_dir), revision="main"))
    assert not (tmp_path / "run").exists()


def test_help_shows_no_default_for_switches(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for switch in ("--no-progress", "--resume", "--no-length-grouping", "--gradient-checkpointing", "--no-rank-eval"):
        assert switch in text
    assert "(default: True)" not in text and "(default: False)" not in text
    assert "(default: 512)" in text and "(default: adafactor)" in text and "(default: q,v)" in text


def test_report_to_an_uninstalled_tracker_is_refused(dataset, tmp_path, tokenizer_dir):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed")
    with pytest.raises(InputError, match="wandb") as excinfo:
        train(config(dataset, tmp_path / "run", model="random:t5-tiny", tokenizer=tokenizer_dir, report_to="wandb"))
    assert excinfo.value.field == "report_to"
    assert not (tmp_path / "run").exists()

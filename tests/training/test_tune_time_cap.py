"""`instructrec train --max-minutes`: the run stops after the step that crosses the cap with a
resumable checkpoint and a loadable final model holding the same weights, and the resumed run
finishes the step budget."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.engine.errors import InputError
from instructrec.training.tune import TrainConfig, train

TITLES = ["Halo 3 - Xbox 360", "Mario Kart 8", "Portal 2 - PC", "Tetris Effect", "Stardew Valley",
          "Forza Horizon 4", "Animal Crossing", "Dark Souls III"]


def write_instructions(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = {"instruction": [f"The shopper bought {TITLES[i - 1]}. What do they buy next?" for i in range(8)],
            "target": TITLES, "template": ["demo"] * 8}
    for split in ("train", "valid"):
        pq.write_table(pa.table(rows), directory / f"{split}.parquet")
    return directory


def config(instructions: Path, out: Path, tokenizer_dir: Path, **overrides) -> TrainConfig:
    base = dict(instructions=instructions, model="random:t5-tiny", tokenizer=tokenizer_dir, out=out, precision="fp32",
                device="cpu", progress=False, batch_size=4, max_steps=4, rank_eval=False, dropout=0.0,
                threads=1, eval_max_rows=4)
    base.update(overrides)
    return TrainConfig(**base)


def test_time_cap_saves_a_checkpoint_and_a_final_model_then_resumes(tmp_path, tokenizer_dir, one_torch_thread):
    import torch
    from transformers import T5ForConditionalGeneration

    data = write_instructions(tmp_path / "data")
    # A cap of ~0 minutes: the first step crosses it (tokenizing alone takes longer).
    capped = train(config(data, tmp_path / "run", tokenizer_dir, max_minutes=1e-9))
    assert capped.time_capped and capped.stopped_early and capped.steps_done == 1
    assert capped.checkpoint.is_dir() and (tmp_path / "run" / "config.json").is_file()
    assert len(capped.evaluations) == 1  # validated before stopping
    final = T5ForConditionalGeneration.from_pretrained(tmp_path / "run").state_dict()
    saved = T5ForConditionalGeneration.from_pretrained(capped.checkpoint).state_dict()
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)

    resumed = train(config(data, tmp_path / "run", tokenizer_dir, resume=True))
    assert not resumed.stopped_early and resumed.steps_done == 4 and sorted(resumed.step_losses) == [2, 3, 4]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_a_non_positive_cap_is_refused_before_training(tmp_path, tokenizer_dir, bad):
    data = write_instructions(tmp_path / "data")
    with pytest.raises(InputError, match="max_minutes"):
        train(config(data, tmp_path / "run", tokenizer_dir, max_minutes=bad))
    assert not (tmp_path / "run").exists()

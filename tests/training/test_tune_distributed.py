"""`instructrec train` on several processes: 2 CPU processes over gloo (torchrun) x 4 rows give the
per-step losses of 1 process x 8 rows, and checkpoints move between the two world sizes without
leaving the curve. The reference is the same trainer in one process: the claim under test is that
the number of processes changes nothing but speed (fp32, dropout 0, same global batch).

41 rows in global batches of 8: each epoch ends with a 1-row batch, so one of the two processes
has an empty slot in it (the zero-weight path) inside the 6 steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from instructrec.engine.errors import InputError
from instructrec.training.tune import TrainConfig, train

from ..conftest import write_train_and_valid

GAMES = ["Halo 3", "Mario Kart 8", "The Last of Us", "FIFA 19", "Minecraft", "Zelda Breath of the Wild",
         "Forza Horizon 4", "Animal Crossing", "Gran Turismo Sport", "Red Dead Redemption 2", "Tetris Effect",
         "Stardew Valley", "Dark Souls III", "Portal 2", "Sonic Mania"]
PLATFORMS = ["Xbox One", "PlayStation 4", "Nintendo Switch", "PC"]
STEPS = 6


def generated_rows(n: int = 41) -> dict[str, list]:
    """n reranking instructions of varied length (1 to 5 history titles, 6 listed candidates),
    deterministic, with the columns validation ranks by (P1 / I0 / T3 / recommendation)."""
    titles = [f"{g} - {p}" for g in GAMES for p in PLATFORMS]
    rows: dict[str, list] = {k: [] for k in ("instruction", "target", "template", "preference", "intention", "task",
                                             "scenario", "candidates", "candidate_ids", "target_item_id")}
    for i in range(n):
        history = [titles[(i * 7 + j * 5) % len(titles)] for j in range(1 + i % 5)]
        positive = (i * 11 + 3) % len(titles)
        listed = sorted({positive, *[(positive + 13 * k + i) % len(titles) for k in range(1, 6)]})
        listing = " ".join(f"({k + 1}) {titles[t]}" for k, t in enumerate(listed))
        rows["instruction"].append(f"The user played {', '.join(history)}. Pick the next one: {listing}")
        rows["target"].append(titles[positive])
        rows["candidates"].append([titles[t] for t in listed])
        rows["candidate_ids"].append([f"g{t}" for t in listed])
        rows["target_item_id"].append(f"g{positive}")
        for column, value in (("template", "P1-I0-T3-gen"), ("preference", "P1"), ("intention", "I0"),
                              ("task", "T3"), ("scenario", "recommendation")):
            rows[column].append(value)
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("generated-instructions")
    return write_train_and_valid(folder, generated_rows())


def settings(dataset: Path, out: Path, tokenizer_dir: Path, **overrides) -> dict:
    base = dict(instructions=dataset, model="random:t5-tiny", tokenizer=tokenizer_dir, out=out, precision="fp32",
                device="cpu", progress=False, max_steps=STEPS, batch_size=8, rank_eval=False, dropout=0.0,
                threads=1, optimizer="adamw", lr=1e-3, eval_max_rows=17, eval_max_instances=12)
    base.update(overrides)
    return base


def cli_flags(config: dict) -> list[str]:
    """`instructrec train` flags for TrainConfig fields (the two switches used here spelt out)."""
    switches = {("progress", False): "--no-progress", ("rank_eval", False): "--no-rank-eval", ("rank_eval", True): None,
                ("resume", True): "--resume"}
    flags = []
    for name, value in config.items():
        if isinstance(value, bool):
            flags += [switches[name, value]] if switches[name, value] else []
        else:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def launch(launcher: list[str], config: dict) -> None:
    done = subprocess.run([sys.executable, "-m", *launcher, "-m", "instructrec", "train", *cli_flags(config)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def torchrun(processes: int, **config) -> None:
    """`torchrun --standalone --nproc_per_node N -m instructrec train` with `config` as flags."""
    launch(["torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)], config)


def step_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def assert_same_curve(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=0), step


@pytest.fixture(scope="module")
def one_process(dataset, tokenizer_dir, tmp_path_factory):
    """The reference: 1 process x 8 rows, 6 steps, validated at step 3 and at the end."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = train(TrainConfig(**settings(dataset, out, tokenizer_dir, rank_eval=True, eval_every=3)))
    losses = result.step_losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert len({round(v, 3) for v in losses.values()}) == STEPS  # the curve moves
    assert [e["step"] for e in result.evaluations] == [3, 6] and result.evaluations[-1]["n"] == 12
    return losses, result.evaluations


def test_two_processes_give_the_per_step_losses_of_one_and_resume_in_one(dataset, tokenizer_dir, tmp_path,
                                                                         one_process):
    reference, evaluations = one_process
    two = tmp_path / "two"
    torchrun(2, **settings(dataset, two, tokenizer_dir, batch_size=4, save_every=3, rank_eval=True, eval_every=3))
    assert_same_curve(step_losses(two), reference, range(1, STEPS + 1))
    # Validation: the loss over both processes' shares, the ranking on the main process.
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    two_evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in two_evals] == [3, 6]
    for got, want in zip(two_evals, evaluations):
        assert got["valid_loss"] == pytest.approx(want["valid_loss"], rel=1e-4)
        assert got["n"] == want["n"] == 12 and got["hr@1"] == want["hr@1"] and got["ndcg@5"] == pytest.approx(want["ndcg@5"])
    run = json.loads((two / "training_config.json").read_text())
    assert run["world_size"] == 2 and run["global_batch_size"] == 8 and run["distributed_type"] == "MULTI_CPU"
    assert (two / "model.safetensors").is_file()

    # Its step-3 checkpoint, resumed by one process with the same global batch (1 x 8).
    resumed = tmp_path / "resumed-in-one"
    shutil.copytree(two / "checkpoints", resumed / "checkpoints")
    shutil.copy(two / "metrics.jsonl", resumed / "metrics.jsonl")
    result = train(TrainConfig(**settings(dataset, resumed, tokenizer_dir, resume=True)))
    assert sorted(result.step_losses) == [4, 5, 6]
    assert_same_curve(result.step_losses, reference, [4, 5, 6])
    assert sorted(step_losses(resumed)) == list(range(1, STEPS + 1))


def test_a_one_process_checkpoint_resumes_in_two(dataset, tokenizer_dir, tmp_path, one_process):
    out = tmp_path / "one-then-two"
    first = train(TrainConfig(**settings(dataset, out, tokenizer_dir, stop_after=3)))
    assert first.stopped_early and first.steps_done == 3
    torchrun(2, **settings(dataset, out, tokenizer_dir, batch_size=4, resume=True))
    assert_same_curve(step_losses(out), one_process[0], range(1, STEPS + 1))


def test_resume_refuses_another_global_batch(dataset, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**settings(dataset, out, tokenizer_dir, stop_after=1)))
    with pytest.raises(InputError, match="global_batch_size") as excinfo:
        train(TrainConfig(**settings(dataset, out, tokenizer_dir, batch_size=4, resume=True)))
    assert excinfo.value.field == "resume"


def test_an_fsdp_launch_on_cpu_is_refused_not_run_as_ddp(dataset, tokenizer_dir, tmp_path, monkeypatch):
    # accelerate 1.15 shards on GPUs only; on CPU it would run DDP (whole model per process).
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(InputError, match="FSDP") as excinfo:
        train(TrainConfig(**settings(dataset, tmp_path / "run", tokenizer_dir)))
    assert excinfo.value.field == "device"
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="FSDP runs on GPUs only (accelerate)")
def test_fsdp_on_the_gpus_gives_the_per_step_losses_of_one_process(dataset, tokenizer_dir, tmp_path, one_process):
    """The GPU check: `accelerate launch --use_fsdp` (full sharding, T5Block wrapping) on every
    visible GPU, the same global batch, against the CPU reference."""
    import torch

    n = torch.cuda.device_count()
    if 8 % n:
        pytest.skip(f"{n} GPUs do not divide the global batch of 8")
    out = tmp_path / "fsdp"
    config = settings(dataset, out, tokenizer_dir, batch_size=8 // n, device="cuda", save_every=3)
    launch(["accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "T5Block", "--fsdp_reshard_after_forward",
            "true", "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"], config)
    assert json.loads((out / "training_config.json").read_text())["distributed_type"] == "FSDP"
    # GPU matmuls (TF32 off in fp32, different reduction order): looser than the CPU comparison.
    for step, loss in step_losses(out).items():
        assert loss == pytest.approx(one_process[0][step], rel=1e-3), step

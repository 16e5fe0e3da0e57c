"""Benchmark inputs: the model (`--models`, resolved by `instructrec.engine.sources`), the
random-weight checkpoint of a `random:<shape>`, seeded requests, and the four workloads of
`instructrec bench`, each turned into the same (instruction, target) work for every provider.

Models: `random:<shape>` (the shapes of `instructrec.engine.presets`, random weights: fair for
speed, never for quality), a Hub id or a checkpoint folder. A bare shape name is refused, as by
every other command: `flan-t5-base` could mean google/flan-t5-base or random:flan-t5-base.

Every provider sees identical inputs: requests come from `make_requests(seed)`, instruction text
from the engine's own `build_instruction` / `render_template`, so a peer and the engine score the
same source and target token ids.

Workloads:
- rerank-10: a history of 20 titles (default template, candidates not listed), 10 candidates.
- rerank-100: 100 candidates listed through the T3 template `seq-rec-02`, ranked by the grouped
  tournament (groups of 10, one winner each, the engine's seed).
- pointwise: one T0 instruction (`seq-rec-03`) per (request, candidate), scored by log P("Yes").
- latency: rerank-10 requests sent one at a time.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from instructrec.engine.errors import InputError

SHARED_TOKENIZER = Path(os.environ.get("INSTRUCTREC_SHARED", Path(__file__).resolve().parents[2] / "shared")) \
    / "assets" / "flan-t5-tokenizer"

WORKLOADS = ("rerank-10", "rerank-100", "pointwise", "latency")
HISTORY_ITEMS = 20
RERANK_CANDIDATES = 10
TOURNAMENT_CANDIDATES = 100
TOURNAMENT_TEMPLATE = "seq-rec-02"  # T3: lists the group's candidates
POINTWISE_TEMPLATE = "seq-rec-03"  # T0: "Would {item} be a welcome next purchase? Answer yes or no."
POINTWISE_TARGET = "Yes"
GROUP_SIZE, ADVANCE = 10, 1  # the engine's defaults
MAX_SOURCE_TOKENS = 512

_SERIES = ["Super Mario", "The Legend of Zelda", "Halo", "Forza Horizon", "Call of Duty", "FIFA", "Resident Evil",
           "Final Fantasy", "Minecraft", "Sonic", "Gran Turismo", "Assassin's Creed", "Pokemon", "Tetris",
           "Street Fighter", "Dark Souls", "Animal Crossing", "Metroid", "Grand Theft Auto", "The Sims"]
_SUFFIX = ["", " 2", " 3", " 4", " Deluxe", " Remastered", " - Game of the Year Edition", " Collection",
           ": Origins", " Online"]
_PLATFORM = ["PlayStation 4", "Xbox One", "Nintendo Switch", "PC", "Nintendo 3DS", "Xbox 360",
             "PlayStation 3"]
_ACCESSORY = ["Wireless Controller", "Gaming Headset with Microphone", "Charging Dock", "Carrying Case",
              "Gaming Mouse", "Mechanical Keyboard", "HDMI Cable 6ft", "Steering Wheel"]


def check_names(field_name: str, given: list[str], known: tuple[str, ...] | list[str]) -> list[str]:
    """The names in `given`, each checked against `known` (InputError names the first unknown)."""
    for name in given:
        if name not in known:
            raise InputError(field_name, f"unknown name {name!r}", f"use a comma-separated subset of {', '.join(known)}")
    if not given:
        raise InputError(field_name, "is empty", f"use a comma-separated subset of {', '.join(known)}")
    return given


def make_title(rng: np.random.Generator) -> str:
    if rng.random() < 0.25:
        return f"{rng.choice(_ACCESSORY)} for {rng.choice(_PLATFORM)}"
    return f"{rng.choice(_SERIES)}{rng.choice(_SUFFIX)} - {rng.choice(_PLATFORM)}"


def make_requests(n: int, history: int, candidates: int, seed: int = 0, template: str | None = None):
    """`n` engine Requests: `history` generated titles, `candidates` distinct titles each."""
    from instructrec.engine import Request

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        titles: list[str] = []
        while len(titles) < candidates:  # distinct titles: a tie would make rankings arbitrary
            titles = list(dict.fromkeys(titles + [make_title(rng) for _ in range(candidates * 3)]))[:candidates]
        out.append(Request(history=[make_title(rng) for _ in range(history)], candidates=titles,
                           request_id=str(i), template=template))
    return out


def resolve_bench_model(spec: str):
    """`--models` entry -> ModelSource: random:<shape>, a Hub id or a checkpoint folder (every
    provider needs the Hugging Face weights, so an ONNX export folder is refused)."""
    from instructrec.engine.sources import CHECKPOINT, RANDOM, ModelSourceError, resolve_model

    try:
        return resolve_model(spec, allowed=(CHECKPOINT, RANDOM))
    except ModelSourceError as e:  # the same message, under the flag's name
        raise InputError("--models", e.problem, e.fix) from e


def cache_key(source, seed: int) -> str:
    """Folder name under --cache for a model's checkpoint, exports and conversions: the shape and
    seed of a random model; for real weights the spec plus a fingerprint of the resolved folder
    (file names, sizes, times), so that new weights under the same name never reuse a conversion."""
    if source.is_random:
        return f"random-{source.shape}-seed{seed}"
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(source.path).iterdir()
                   if p.is_file())
    fingerprint = hashlib.sha1(repr((str(source.path), source.commit, files)).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '--', source.spec).strip('-')}-{fingerprint}"


def model_checkpoint(source, cache: Path, seed: int) -> Path:
    """The Hugging Face checkpoint folder every provider loads: the resolved folder of real weights,
    or, for random:<shape>, a random-weight checkpoint built once under `cache`."""
    if not source.is_random:
        return Path(source.path)
    return build_checkpoint(Path(cache) / cache_key(source, seed) / "checkpoint", source.config(), seed)


def architecture_of(config: dict) -> str | None:
    """The preset shape (engine/presets.py) whose architecture `config` has, or None."""
    from instructrec.engine.presets import SHAPES

    keys = ("d_model", "d_ff", "d_kv", "num_layers", "num_heads", "vocab_size")
    for name, shape in SHAPES.items():
        if all(config.get(k) == shape[k] for k in keys) and \
                (config.get("num_decoder_layers") or config["num_layers"]) == shape["num_decoder_layers"]:
            return name
    return None


def build_checkpoint(out_dir: Path, config: dict, seed: int = 0, tokenizer_dir: Path = SHARED_TOKENIZER) -> Path:
    """A random-weight T5ForConditionalGeneration of `config` (a config.json dict, e.g.
    `instructrec.engine.presets.shape_config(name)`) with the real tokenizer beside it
    (save_pretrained layout); reused when already there. Fair for speed, never for quality."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    if not (Path(tokenizer_dir) / "tokenizer.json").exists() and not (Path(tokenizer_dir) / "spiece.model").exists():
        raise InputError("tokenizer", f"no tokenizer in {tokenizer_dir}",
                         "set INSTRUCTREC_SHARED to the folder holding assets/flan-t5-tokenizer")
    torch.manual_seed(seed)
    fields = {k: v for k, v in config.items() if k != "model_type"}  # T5Config sets model_type itself
    model = T5ForConditionalGeneration(T5Config(**fields)).eval()
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


# ---- the work of a workload, provider-independent ---------------------------------------------


@dataclass
class Encoding:
    """One instruction encoding and the targets scored under it (token ids, closing </s> included)."""

    source: list[int]
    targets: list[list[int]]


@dataclass
class WorkloadInputs:
    name: str
    requests: list  # engine Requests (rerank-10 / rerank-100 / latency), or the rerank-10 requests (pointwise)
    # pointwise only: per request, the T0 instruction of each candidate
    pointwise_sources: list[list[str]] = field(default_factory=list)

    @property
    def n_requests(self) -> int:
        return len(self.requests)

    @property
    def n_candidates(self) -> int:
        return sum(len(r.candidates) for r in self.requests)


def workload_inputs(name: str, n_requests: int, seed: int, tokenizer: Any,
                    tournament_candidates: int = TOURNAMENT_CANDIDATES) -> WorkloadInputs:
    """The seeded inputs of a workload (`tournament_candidates`: fewer for a warm-up)."""
    check_names("--workloads", [name], WORKLOADS)
    if name == "rerank-100":
        requests = make_requests(n_requests, HISTORY_ITEMS, tournament_candidates, seed, TOURNAMENT_TEMPLATE)
        return WorkloadInputs(name, requests)
    requests = make_requests(n_requests, HISTORY_ITEMS, RERANK_CANDIDATES, seed)
    if name != "pointwise":
        return WorkloadInputs(name, requests)
    return WorkloadInputs(name, requests, [pointwise_sources(r, tokenizer) for r in requests])


def pointwise_sources(request: Any, tokenizer: Any) -> list[str]:
    from instructrec.engine.formatting import render_template

    return [render_template(POINTWISE_TEMPLATE, {"history": request.history, "item": title}, tokenizer=tokenizer,
                            max_source_tokens=MAX_SOURCE_TOKENS).source for title in request.candidates]


def instruction_text(request: Any, titles: list[str] | None, tokenizer: Any) -> str:
    """The engine's text for a request (and, for a listing template, the group's titles)."""
    from instructrec.engine.formatting import build_instruction

    return build_instruction(history=request.history, template=request.template,
                             candidates=None if titles is None else list(titles), tokenizer=tokenizer,
                             max_source_tokens=MAX_SOURCE_TOKENS)


def tokenize_targets(tokenizer: Any, titles: list[str]) -> list[list[int]]:
    """Target ids exactly as the engine makes them (closing </s> included)."""
    return [list(ids) for ids in tokenizer(text_target=list(titles), add_special_tokens=True)["input_ids"]]


def tokenize_source(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def run_tournament_scoring(request: Any, scorer: Callable[[list[Encoding]], list[np.ndarray]], tokenizer: Any,
                           seed: int, timer: "Stopwatch | None" = None) -> tuple[np.ndarray, list[Encoding]]:
    """Rank a listing request's candidates with the engine's Tournament, every group scored by
    `scorer` (one call per round, all groups together). Returns (ranking, encodings scored)."""
    from instructrec.engine.tournament import Tournament

    titles = list(request.candidates)
    targets = None
    tournament = Tournament(len(titles), GROUP_SIZE, ADVANCE, seed)
    done: list[Encoding] = []
    while not tournament.done:
        groups = tournament.groups()
        with (timer or Stopwatch()).tokenizing():
            if targets is None:
                targets = tokenize_targets(tokenizer, titles)
            encodings = [Encoding(tokenize_source(tokenizer, instruction_text(request, [titles[c] for c in g],
                                                                              tokenizer)),
                                  [targets[c] for c in g]) for g in groups]
        tournament.record(scorer(encodings))
        done += encodings
    ranking, _ = tournament.result()
    return ranking, done


def model_work(inputs: WorkloadInputs, tokenizer: Any, seed: int) -> list[Encoding]:
    """The encodings the work needs, the same for every provider: one per request (rerank-10,
    latency), one per (request, candidate) (pointwise), one per tournament group (rerank-100).
    Later tournament rounds are counted with a stand-in scorer: the group sizes are exact, and
    which titles advance changes the token count by a few tokens."""
    if inputs.name == "rerank-100":
        work: list[Encoding] = []
        for r in inputs.requests:
            work += run_tournament_scoring(r, lambda encs: [np.zeros(len(e.targets)) for e in encs],
                                           tokenizer, seed)[1]
        return work
    if inputs.name == "pointwise":
        yes = tokenize_targets(tokenizer, [POINTWISE_TARGET])[0]
        return [Encoding(tokenize_source(tokenizer, s), [yes]) for sources in inputs.pointwise_sources
                for s in sources]
    return [Encoding(tokenize_source(tokenizer, instruction_text(r, None, tokenizer)),
                     tokenize_targets(tokenizer, list(r.candidates))) for r in inputs.requests]


class Stopwatch:
    """Splits a provider's wall time into tokenization and the rest."""

    def __init__(self) -> None:
        self.tokenize_s = 0.0

    def tokenizing(self) -> "_Section":
        return _Section(self)


class _Section:
    def __init__(self, watch: Stopwatch) -> None:
        self.watch = watch

    def __enter__(self) -> None:
        import time

        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        import time

        self.watch.tokenize_s += time.perf_counter() - self.t0

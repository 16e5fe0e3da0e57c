"""The training step before and after issue 18, each variant in a fresh process on the same rows.

    python -m instructrec.bench.train_step --instructions DIR/train.parquet \
        --tokenizer ../shared/assets/flan-t5-tokenizer [--shapes t5-mini,t5-micro] [--threads 2]
        [--steps 200 --warmup 40] [--variants bf16,fused-norm --rounds 3]
        [--cells t5-mini:bf16,t5-micro:fused-norm@64 --rounds 3]

Each variant trains a fresh random-weight model of a shape (engine/presets.py) for --warmup
untimed steps, then --steps timed ones over the same seeded rows, with AdamW and gradient
clipping as `instructrec train` runs them. Variants, each adding one change to the one before:

- `plain`: the Hugging Face forward's full [rows x target length x 32,128] logits, padding
  positions included, fp32, shuffled batches;
- `+ length-grouped`: batches of rows of similar source length (less padding; the trainer has
  grouped from the start);
- `+ bf16 autocast`: only where the CPU runs bf16 matmuls natively (engine/capabilities.py,
  what `--precision auto` picks); elsewhere the row says why it was skipped. This row is the
  trainer as issue 18 found it on such a CPU;
- `+ real-token head`: the head and log-softmax on real target tokens only
  (training.loss.linear_cross_entropy through install_hidden_states_head): issue 18's change;
- `+ fused AdamW`: torch's fused AdamW kernel (what `instructrec train` builds on a CPU or one
  GPU) where the rows above run the multi-tensor (foreach) loop;
- `+ shape buckets`: source and target lengths rounded up to multiples of 16 and the head's rows
  to 64 (training.tune_data.SHAPE_MULTIPLE, what `instructrec train` does in bf16 on a CPU), so
  oneDNN's per-shape bf16 kernels are reused; only where the bf16 row runs.
- `+ compact vocabulary`: `instructrec train --compact-vocab` (training/compact_vocab.py): the
  model's embedding, LM head and softmax hold only the tokens the whole --instructions file
  uses (plus the templates' wording, single characters and special tokens), not 32,128; the rows
  are tokenized with that tokenizer. Buckets on where the row above runs.
- `+ fused GELU`: each feed-forward's tanh-GELU as torch's one fused kernel instead of Hugging
  Face's eight-operator expression of the same formula
  (training.tune_model.install_fused_activations, what `instructrec train` does).
- `+ fused RMS norm`: T5's RMS norms with a hand-written backward, eight operators where autograd
  through Hugging Face's expression records about fourteen (training.tune_model.install_fused_norms,
  what `instructrec train` does).

Each variant runs in a process of its own: the kernels oneDNN compiles for one variant's shapes
would otherwise serve the next variant's identical batches and flatter it.

`--variants` measures only the named ones (the keys in brackets in `--help`), `--rounds N` each of
them N times, interleaved (every variant of every shape once per round, in order): a drift of the
machine's speed then reaches every variant alike, and the ratio is taken within each round. On 2
shared cores single runs of one variant vary by ~10%, more than the gains of the last rows.
`--cells SHAPE:KEY[@BATCH],...` measures exactly those combinations instead (batch: --batch-size
unless given), interleaved the same way, each against the first cell of its round: the trainer as
found against a smaller shape with every change, or one recipe at two batch sizes, in one run.

Printed: rows/s and rows per CPU-second (both processes' threads counted), and each variant's
rows/CPU-s as a ratio to the first variant measured for the same shape (`plain` unless
`--variants` says otherwise; with `--cells`, to the first cell); with rounds, the medians and the
spread of rows/s. Ratios, not absolute speeds, are what carry to another machine; the CPU and its
flags head the report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path


# The variants in the order of the table, each adding one change to the one before (module doc).
VARIANT_NAMES = {"plain": "plain", "grouped": "+ length-grouped", "bf16": "+ bf16 autocast",
                 "head": "+ real-token head", "fused-adamw": "+ fused AdamW", "buckets": "+ shape buckets",
                 "compact": "+ compact vocabulary", "fused-gelu": "+ fused GELU", "fused-norm": "+ fused RMS norm"}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(rows, shape: str, *, head: bool, grouped: bool, bf16: bool, batch_size: int, steps: int,
            warmup: int, fused: bool = False, multiple: int = 1, seed: int = 0, threads: int | None = None,
            vocab_size: int | None = None, fused_gelu: bool = False, fused_norm: bool = False) -> dict:
    import torch
    from transformers import T5Config

    from instructrec.engine.presets import shape_config
    from instructrec.training.tune_data import collate, epoch_batches, head_rows_multiple
    from instructrec.training.tune_model import (install_fused_activations, install_fused_norms,
                                                 install_hidden_states_head, random_t5, sequence_nll_sum)

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = shape_config(shape)
    config.pop("model_type", None)
    config["dropout_rate"] = 0.0
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    model = random_t5(T5Config(**config)).train()  # the model `train` starts from for random:<shape>
    stand_in = install_hidden_states_head(model) if head else None
    if fused_gelu:
        install_fused_activations(model)
    if fused_norm:
        install_fused_norms(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if fused else {"foreach": True}))
    lengths = rows.source_lengths
    batches = epoch_batches(lengths, batch_size, seed, 0, grouped)
    if len(batches) < warmup + steps:
        raise SystemExit(f"--instructions has {len(lengths)} rows: {len(batches)} batches of {batch_size}, "
                         f"fewer than --warmup + --steps = {warmup + steps}")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    examples = 0
    started_wall = started_cpu = 0.0
    for index, indices in enumerate(batches[:warmup + steps]):
        if index == warmup:
            started_wall, started_cpu = time.perf_counter(), _cpu_seconds()
        input_ids, attention, decoder_ids, labels = collate(rows, indices, 0, 0, "cpu", multiple)
        with autocast:
            nll = sequence_nll_sum(model, input_ids, attention, decoder_ids, labels, head=stand_in,
                                   head_rows_multiple=head_rows_multiple(multiple))
        (nll / (labels != -100).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            examples += len(indices)
    wall = time.perf_counter() - started_wall
    cpu = _cpu_seconds() - started_cpu
    return {"rows_per_s": examples / wall, "rows_per_cpu_s": examples / cpu, "steps": steps, "wall_s": wall}


def measure_in_fresh_process(rows, shape: str, **flags) -> dict:
    """`measure` in a spawned process of its own (no kernel cache, allocator or thread pool shared
    with the variant measured before it)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (rows, shape), flags)


@dataclass(frozen=True)
class Cell:
    """One measured combination; `group` names the cells whose ratios share a base (its first)."""

    shape: str
    key: str
    batch_size: int
    group: str

    @property
    def name(self) -> str:
        return VARIANT_NAMES[self.key]

    def label(self) -> str:
        return f"{self.shape} {self.name} @{self.batch_size}"


def parse_cells(text: str, default_batch: int, shapes, error) -> list[Cell]:
    """--cells "SHAPE:KEY[@BATCH],..." -> Cells of one group; `error(message)` on anything else."""
    cells = []
    for spec in (part.strip() for part in text.split(",")):
        head, at, batch_text = spec.partition("@")
        shape, colon, key = head.partition(":")
        if not colon or shape not in shapes or key not in VARIANT_NAMES:
            error(f"--cells: {spec!r} is not SHAPE:KEY[@BATCH] with a shape of {', '.join(shapes)} and a key of "
                  f"{', '.join(VARIANT_NAMES)}")
        if at and not (batch_text.isdigit() and int(batch_text) >= 1):
            error(f"--cells: {spec!r}: the batch after @ must be a whole number >= 1")
        cells.append(Cell(shape, key, int(batch_text) if at else default_batch, group="cells"))
    if len(set(cells)) != len(cells):
        error(f"--cells: {text!r} names a cell twice")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructrec.bench.train_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--instructions", type=Path, required=True, help="an instruction build's train.parquet")
    parser.add_argument("--tokenizer", type=Path, required=True, help="Flan-T5 tokenizer folder")
    parser.add_argument("--shapes", default=None, help="comma-separated shapes of engine/presets.py (default: t5-mini)")
    parser.add_argument("--batch-size", type=int, default=16)
    # 200 timed steps after 40 untimed ones: oneDNN builds a bf16 kernel for every new batch shape,
    # and over 20 timed steps those builds and the machine's noise moved a ratio by a quarter
    # (docs/benchmarks.md, "Fused GELU and RMS norm, and the same bench at 200 steps").
    parser.add_argument("--steps", type=int, default=200, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=40, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-rows", type=int, default=4096, help="rows read from --instructions")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every variant in this process (quick checks; later variants may "
                             "reuse kernels compiled for earlier ones)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants to measure, in this order: "
                             + ", ".join(f"{key} ({name})" for key, name in VARIANT_NAMES.items())
                             + " (default: all)")
    parser.add_argument("--cells", default=None,
                        help="instead of --shapes x --variants: comma-separated SHAPE:KEY[@BATCH] cells, e.g. "
                             "t5-mini:bf16,t5-micro:fused-norm@64; ratios against the first cell")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every variant this many times, interleaved; report medians (default: 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (every round)")
    args = parser.parse_args(argv)
    if args.cells is not None and (args.shapes is not None or args.variants is not None):
        parser.error("--cells names each shape and variant itself: drop --shapes and --variants")
    variant_keys = [v.strip() for v in (args.variants or ",".join(VARIANT_NAMES)).split(",") if v.strip()]
    wrong = [v for v in variant_keys if v not in VARIANT_NAMES]
    if wrong or not variant_keys:
        parser.error(f"--variants: unknown {', '.join(wrong) or '(none given)'}; known: {', '.join(VARIANT_NAMES)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")

    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from instructrec.engine.capabilities import auto_dtype_name, cpu_info
    from instructrec.engine.presets import SHAPES
    from instructrec.training.compact_vocab import compact_tokenizer, vocab_rows
    from instructrec.training.tune_data import SHAPE_MULTIPLE, tokenize_rows

    if args.cells is not None:
        cells = parse_cells(args.cells, args.batch_size, SHAPES, parser.error)
    else:
        shapes = [s.strip() for s in (args.shapes or "t5-mini").split(",") if s.strip()]
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            parser.error(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(SHAPES)}")
        # One group per shape: each variant's ratio is against its shape's first variant.
        cells = [Cell(shape, key, args.batch_size, group=shape) for shape in shapes for key in variant_keys]
    if not args.instructions.is_file():
        parser.error(f"--instructions {args.instructions}: no such file (an instruction build's train.parquet)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    whole = pq.read_table(args.instructions, columns=["instruction", "target"])
    table = whole.slice(0, args.max_rows)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = table.column("instruction").to_pylist(), table.column("target").to_pylist()
    rows = tokenize_rows(tokenizer, *texts, 512, 64, "train")
    largest = max(cell.batch_size for cell in cells)
    batches = -(-table.num_rows // largest)
    if batches < args.warmup + args.steps:
        parser.error(f"{table.num_rows} rows make {batches} batches of {largest}, fewer than --warmup + "
                     f"--steps = {args.warmup + args.steps}: raise --max-rows (the file has {whole.num_rows}) "
                     "or lower --steps")
    # The compact vocabulary of the whole file, as `instructrec train --compact-vocab` builds it.
    compact = compact_tokenizer(tokenizer, itertools.chain(whole.column("instruction").to_pylist(),
                                                           whole.column("target").to_pylist()))
    compact_rows = tokenize_rows(compact, *texts, 512, 64, "train")
    native_bf16 = auto_dtype_name("cpu") == "bfloat16"
    info = cpu_info()
    print(f"CPU: {info.summary()}; {torch.get_num_threads()} torch threads; {table.num_rows} rows of "
          f"{args.instructions}; compact vocabulary of the whole file: {len(compact)} tokens in "
          f"{vocab_rows(compact)} rows (full: {len(tokenizer)})")
    compact_step = dict(head=True, grouped=True, bf16=native_bf16, fused=True,
                        multiple=SHAPE_MULTIPLE if native_bf16 else 1, vocab_size=vocab_rows(compact))
    settings = {"plain": dict(head=False, grouped=False, bf16=False),
                "grouped": dict(head=False, grouped=True, bf16=False),
                "bf16": dict(head=False, grouped=True, bf16=True),
                "head": dict(head=True, grouped=True, bf16=native_bf16),
                "fused-adamw": dict(head=True, grouped=True, bf16=native_bf16, fused=True),
                "buckets": dict(head=True, grouped=True, bf16=True, fused=True, multiple=SHAPE_MULTIPLE),
                "compact": compact_step,
                "fused-gelu": dict(compact_step, fused_gelu=True),
                "fused-norm": dict(compact_step, fused_gelu=True, fused_norm=True)}
    runnable = []
    for cell in cells:
        if settings[cell.key]["bf16"] and not native_bf16:
            print(f"{cell.shape} {cell.name}: skipped, this CPU has no native bf16 matmul "
                  "(auto picks fp32)")
        else:
            runnable.append(cell)
    results = []
    by_cell: dict[Cell, list[dict]] = {cell: [] for cell in runnable}
    run = measure if args.in_process else measure_in_fresh_process
    first = {}  # group -> its first runnable cell: the base of the group's ratios
    for cell in runnable:
        first.setdefault(cell.group, cell)
    for round_index in range(args.rounds):
        base: dict[str, float] = {}
        for cell in runnable:
            flags = settings[cell.key]
            r = run(compact_rows if "vocab_size" in flags else rows, cell.shape, batch_size=cell.batch_size,
                    steps=args.steps, warmup=args.warmup, threads=args.threads, **flags)
            base.setdefault(cell.group, r["rows_per_cpu_s"])
            r.update(shape=cell.shape, variant=cell.name, key=cell.key, batch_size=cell.batch_size,
                     round=round_index + 1, ratio=r["rows_per_cpu_s"] / base[cell.group])
            by_cell[cell].append(r)
            results.append(r)
            print(f"round {round_index + 1}/{args.rounds}: {cell.label()}: {r['rows_per_s']:.1f} rows/s, "
                  f"{r['rows_per_cpu_s']:.1f} rows/CPU-s, x{r['ratio']:.2f} {first[cell.group].label()}", flush=True)
    spread = args.rounds > 1
    for group in dict.fromkeys(cell.group for cell in runnable):
        base_label = first[group].name if args.cells is None else first[group].label()
        print(f"\n| shape | variant | batch | rows/s{' (median; min-max)' if spread else ''} | rows/CPU-s | "
              f"x {base_label} (rows/CPU-s{', median of rounds' if spread else ''}) |\n|---|---|---:|---:|---:|---:|")
        for cell in (c for c in runnable if c.group == group):
            measured = by_cell[cell]
            speeds = [r["rows_per_s"] for r in measured]
            shown = (f"{statistics.median(speeds):.1f}; {min(speeds):.1f}-{max(speeds):.1f}" if spread
                     else f"{speeds[0]:.1f}")
            print(f"| {cell.shape} | {cell.name} | {cell.batch_size} | {shown} | "
                  f"{statistics.median(r['rows_per_cpu_s'] for r in measured):.1f} | "
                  f"{statistics.median(r['ratio'] for r in measured):.2f} |", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"cpu": info.summary(), "threads": torch.get_num_threads(), "results": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training data: the instruction splits read and checked, tokenized once into flat arrays, and the
data order, a pure function of (seed, epoch, global batch size) that every process computes alike.

One optimiser step consumes one *global batch* of rows (batch size x processes x accumulation).
Its rows are cut into `grad_accum x world_size` micro-batch slots; process r runs the slots
r, r + world, r + 2 world, ... . So 2 processes x 4 rows, 1 x 8 and 1 x 4 x 2 accumulated see
the same rows at every step, and a checkpoint (epoch, position in global batches) means the same
thing at any world size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instructrec.engine.errors import InputError

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ("instruction", "target", "template")
# Columns that select and rank the sequential-recommendation validation instances.
SEQREC_COLUMNS = ("preference", "intention", "task", "scenario", "candidates", "candidate_ids", "target_item_id")
SEQREC_FILTER = dict(preference="P1", intention="I0", scenario="recommendation")
# Both forms that rank a candidate list: T3 lists the candidates in the instruction, T2 asks for the
# item without a list (each candidate's title scored as the answer). Each template is ranked and
# reported on its own: a model trained for minutes from random weights ranks about twice as well
# with T2 (docs/results.md, "The ranking template").
SEQREC_TASKS = ("T3", "T2")
# Length grouping sorts rows by source length inside windows of this many global batches, then
# shuffles the batches: padding falls from ~45% to ~3% of source tokens on the Video Games
# instructions (the template mixture spans 40 to 500 tokens) while each batch still mixes templates.
LENGTH_GROUP_WINDOW_BATCHES = 64
# Where a training step runs in bf16 on a CPU, oneDNN builds (JIT-compiles) a matmul kernel for every
# new operand shape, and a length-grouped batch's [rows x source length] and [rows x target length]
# are nearly always new: a profile of a t5-mini run on Video Games (AMX Xeon) spent ~13% of its samples in
# oneDNN's primitive creation. Rounding both lengths up to a multiple of this (and the LM head's
# real-token rows to four times it: head_rows_multiple) leaves few distinct shapes, so the kernels
# are reused; the padding is masked out of attention and ignored by the loss (`--pad-to-multiple`).
SHAPE_MULTIPLE = 16


def head_rows_multiple(multiple: int) -> int:
    """The LM head's row count is rounded to this when sequence lengths are rounded to `multiple`: a
    batch's real target tokens number anything from a few to hundreds, so a coarser step."""
    return 1 if multiple <= 1 else 4 * multiple


def read_split(path: Path, required: tuple[str, ...], label: str):
    """The Parquet table at `path`, with the `required` columns, rows, and no null text."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError("instructions", f"{path} does not exist",
                         "point --instructions at the folder written by `instructrec instructions build`")
    table = pq.read_table(path)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise InputError(f"{label}: columns", f"{path} lacks column(s) {', '.join(missing)}",
                         "rebuild it with `instructrec instructions build`")
    if table.num_rows == 0:
        raise InputError(label, f"{path} has no rows", "build the instructions from a non-empty split, or check its filters")
    for column in ("instruction", "target"):
        if column in required and table.column(column).null_count:
            raise InputError(f"{label}: {column}", f"{table.column(column).null_count} null value(s) in {path}",
                             "drop or fill those rows")
    return table


# The template id of the rows `with_title_prior_rows` adds.
TITLE_PRIOR_TEMPLATE = "title-prior"


def with_title_prior_rows(table, fraction: float, seed: int):
    """`table` (its TRAIN_COLUMNS) plus round(fraction x rows), at least one, *title-prior rows*: the
    empty instruction answered by a target drawn uniformly from the table's rows, so a title is
    drawn as often as it is a training target. The engine's calibrated score forms subtract a
    title's log-likelihood under that same empty instruction; a model trained on these rows is
    taught there how often each title is a target (its popularity in the training data), an input
    it otherwise never sees. The draws are a pure function of the seed."""
    import pyarrow as pa

    count = max(1, round(fraction * table.num_rows))
    picks = np.random.default_rng([int(seed), 0x5052]).integers(0, table.num_rows, size=count)  # "PR"
    prior = pa.table({"instruction": pa.array([""] * count, pa.string()),
                      "target": table.column("target").take(pa.array(picks)).cast(pa.string()),
                      "template": pa.array([TITLE_PRIOR_TEMPLATE] * count, pa.string())})
    own = pa.table({c: table.column(c).cast(pa.string()) for c in TRAIN_COLUMNS})
    return pa.concat_tables([own, prior])


# The template id of the rows `spelled_rows` adds.
SPELLED_TEMPLATE = "title-spelled"


def spelled_picks(n_rows: int, fraction: float, seed: int) -> np.ndarray:
    """The rows --spell-rows adds again, round(fraction x rows) of them (none for 0), drawn with
    replacement: a pure function of the seed."""
    count = round(fraction * n_rows)
    return np.random.default_rng([int(seed), 0x5350]).integers(0, n_rows, size=count)  # "SP"


def spelled_rows(rows: "TokenizedRows", picks: np.ndarray, targets: list[str], piece_tokenizer,
                 max_target_length: int) -> "TokenizedRows":
    """`rows` plus, for each pick, that row's source again with its target spelt by `piece_tokenizer`
    (the vocabulary before --item-tokens added the titles): the same sources, each title as the pieces
    a new item's title is scored by."""
    sources = [rows.source(int(i)) for i in picks]
    tf, to = _tokenize_column(piece_tokenizer, [targets[int(i)] for i in picks], max_target_length,
                              "spelled targets")
    lengths = np.fromiter((len(x) for x in sources), dtype=np.int64, count=len(sources))
    source_flat = np.concatenate([rows.source_flat, *sources]) if len(sources) else rows.source_flat
    source_offsets = np.concatenate([rows.source_offsets, rows.source_offsets[-1] + np.cumsum(lengths)])
    return TokenizedRows(source_flat, source_offsets, np.concatenate([rows.target_flat, tf]),
                         np.concatenate([rows.target_offsets, rows.target_offsets[-1] + to[1:]]))


@dataclass
class TokenizedRows:
    """Sources and targets as flat int32 arrays with row offsets (row i: flat[off[i]:off[i+1]]).
    A 100k-row dataset of ~300-token instructions is ~120 MB this way, ~2.4 GB as Python lists."""

    source_flat: np.ndarray
    source_offsets: np.ndarray
    target_flat: np.ndarray
    target_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.source_offsets) - 1

    @property
    def source_lengths(self) -> np.ndarray:
        return np.diff(self.source_offsets)

    @property
    def target_lengths(self) -> np.ndarray:
        return np.diff(self.target_offsets)

    def source(self, i: int) -> np.ndarray:
        return self.source_flat[self.source_offsets[i]:self.source_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self.target_flat[self.target_offsets[i]:self.target_offsets[i + 1]]


def _tokenize_column(tokenizer, texts: list[str], max_length: int, label: str):
    """Token ids with </s>; rows over `max_length` keep their first max_length-1 tokens + </s>."""
    eos = tokenizer.eos_token_id
    pieces, offsets, truncated = [], [0], 0
    for start in range(0, len(texts), 4096):
        for ids in tokenizer(texts[start:start + 4096], add_special_tokens=True)["input_ids"]:
            if len(ids) > max_length:
                ids = ids[:max_length - 1] + [eos]
                truncated += 1
            pieces.append(np.asarray(ids, dtype=np.int32))
            offsets.append(offsets[-1] + len(ids))
    if truncated:
        log.warning("%s: %d of %d rows exceed %d tokens and were truncated (raise the limit to keep them)",
                    label, truncated, len(texts), max_length)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return flat, np.asarray(offsets, dtype=np.int64)


def tokenize_rows(tokenizer, instructions: list[str], targets: list[str], max_source_length: int,
                  max_target_length: int, label: str) -> TokenizedRows:
    sf, so = _tokenize_column(tokenizer, instructions, max_source_length, f"{label} instructions")
    tf, to = _tokenize_column(tokenizer, targets, max_target_length, f"{label} targets")
    return TokenizedRows(sf, so, tf, to)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  length_grouped: bool) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch): resuming needs only the epoch
    and the position in this list."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not length_grouped:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * LENGTH_GROUP_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchStream:
    """Endless global batches over epochs; (epoch, position) is the whole data-order state."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, length_grouped: bool,
                 epoch: int = 0, position: int = 0):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.length_grouped = length_grouped
        self.epoch, self.position = epoch, position
        self.batches = epoch_batches(lengths, batch_size, seed, epoch, length_grouped)

    def __next__(self) -> np.ndarray:
        if self.position >= len(self.batches):
            self.epoch += 1
            self.position = 0
            self.batches = epoch_batches(self.lengths, self.batch_size, self.seed, self.epoch, self.length_grouped)
        batch = self.batches[self.position]
        self.position += 1
        return batch

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.position / len(self.batches)


def process_slots(rows: np.ndarray, n_micro: int, world_size: int, rank: int) -> list[np.ndarray]:
    """This process's `n_micro` micro-batches of a global batch: the rows are cut into
    n_micro x world_size near-equal contiguous slots and process `rank` takes slots
    rank, rank + world_size, ... . A slot is empty only when the batch (an epoch's last) has
    fewer rows than slots; the process then runs a zero-weight step so collectives stay in step."""
    slots = np.array_split(rows, n_micro * world_size)
    return [slots[m * world_size + rank] for m in range(n_micro)]


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (1: unchanged)."""
    return -(-length // multiple) * multiple


def _pad_targets(targets: list[np.ndarray], pad_id: int, decoder_start_id: int, multiple: int = 1):
    """labels [N, T] padded with -100 and decoder_input_ids [N, T]: T5's _shift_right done where the
    arrays are built ([start, labels[:-1]], -100 read as pad). T is the longest target rounded up to
    `multiple`."""
    labels = np.full((len(targets), padded_length(max(len(t) for t in targets), multiple)), -100, dtype=np.int64)
    for r, t in enumerate(targets):
        labels[r, :len(t)] = t
    decoder_ids = np.empty_like(labels)
    decoder_ids[:, 0] = decoder_start_id
    decoder_ids[:, 1:] = np.where(labels[:, :-1] == -100, pad_id, labels[:, :-1])
    return decoder_ids, labels


def collate(rows: TokenizedRows, indices: np.ndarray, pad_id: int, decoder_start_id: int, device,
            multiple: int = 1):
    """input_ids / attention_mask [B, S] right-padded; labels [B, T] padded with -100;
    decoder_input_ids [B, T]: the labels shifted right behind decoder_start (teacher forcing),
    padding read as pad. Giving the model decoder inputs rather than labels keeps Hugging Face
    from computing a second (mean) loss. S and T are the longest source and target rounded up to
    `multiple` (SHAPE_MULTIPLE): padding is masked out of attention and ignored by the loss."""
    import torch

    sources = [rows.source(i) for i in indices]
    input_ids = np.full((len(indices), padded_length(max(len(s) for s in sources), multiple)), pad_id,
                        dtype=np.int64)
    attention = np.zeros_like(input_ids)
    for r, s in enumerate(sources):
        input_ids[r, :len(s)] = s
        attention[r, :len(s)] = 1
    decoder_ids, labels = _pad_targets([rows.target(i) for i in indices], pad_id, decoder_start_id, multiple)
    return tuple(torch.from_numpy(a).to(device) for a in (input_ids, attention, decoder_ids, labels))


def collate_negatives(rows: TokenizedRows, negatives: np.ndarray, pad_id: int, decoder_start_id: int, device,
                      prefix_tokens: int = 0):
    """The decoder side of `negatives` ([B, K] row indices, NegativePool.draw): decoder_input_ids and
    labels [B x K, T'] in row-major order (row r's K negatives together), each target cut to its
    first `prefix_tokens` tokens when that is set. Padded on their own, not to the own targets'
    length: the negatives are decoded in a pass of their own."""
    import torch

    cut = prefix_tokens or None
    targets = [rows.target(j)[:cut] for j in negatives.reshape(-1)]
    return tuple(torch.from_numpy(a).to(device) for a in _pad_targets(targets, pad_id, decoder_start_id))


@dataclass
class SeqRecInstance:
    instruction: str
    candidates: list[str]
    candidate_ids: list[str]
    positive_id: str
    template: str = ""


def _ranks_titles(template: str, task: str) -> bool:
    """Whether a P1/I0 row of `template` ranks its candidates' titles: every T3 row does; a T2 row
    only where the registry's template answers with the item's title (not the diversity ones)."""
    if task == "T3":
        return True
    from instructrec.engine.templates import REGISTRY

    return template in REGISTRY and REGISTRY[template].ranks_titles


def seqrec_instances(table, path: Path) -> list[SeqRecInstance]:
    """Valid rows P1/I0/recommendation of task T3 or T2 (see SEQREC_TASKS): one positive among
    the candidates, in file order."""
    columns = {c: table.column(c).to_pylist() for c in ("instruction", "template", *SEQREC_COLUMNS)}
    instances = []
    for i in range(table.num_rows):
        if any(columns[k][i] != v for k, v in SEQREC_FILTER.items()) or columns["task"][i] not in SEQREC_TASKS:
            continue
        if not _ranks_titles(columns["template"][i], columns["task"][i]):
            continue
        candidates, ids, positive = columns["candidates"][i], columns["candidate_ids"][i], columns["target_item_id"][i]
        if not candidates or not ids or len(candidates) != len(ids):
            raise InputError("valid: candidates", f"row {i} of {path} has {len(candidates or [])} "
                             f"candidates and {len(ids or [])} candidate_ids",
                             "rebuild the instructions: ranking rows hold aligned candidates and ids")
        if positive not in ids:
            raise InputError("valid: target_item_id", f"row {i} of {path}: {positive!r} is not "
                             "among its candidate_ids", "rebuild the instructions")
        instances.append(SeqRecInstance(columns["instruction"][i], list(candidates), list(ids), positive,
                                        columns["template"][i]))
    return instances


VALIDATION_SEED = 0
"""The seed of the validation subsets (`--eval-max-rows`, `--eval-max-instances`): fixed, not the
run's `--seed`, so that runs differing in seed are validated on the same rows."""


def per_template_subset(instances: list[SeqRecInstance], limit: int, seed: int) -> list[SeqRecInstance]:
    """A seeded subset of at most `limit` instances of each template (all when limit is 0), by
    template id. The same seed picks the same positions in every template's rows, so templates
    built from the same users are compared on the same users."""
    by_template: dict[str, list[SeqRecInstance]] = {}
    for instance in instances:
        by_template.setdefault(instance.template, []).append(instance)
    return [group[i] for _, group in sorted(by_template.items()) for i in seeded_subset(len(group), limit, seed)]


def seeded_subset(n: int, limit: int, seed: int) -> np.ndarray:
    """A fixed, seeded subset of `limit` row indices in ascending order (all when limit is 0)."""
    if limit == 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 7919]).choice(n, size=limit, replace=False))


class NegativePool:
    """Other targets to rank each row's target against (`train --rank-negatives`): for a row of
    template t, targets drawn uniformly from the DISTINCT targets of template t's rows, never the
    row's own. Uniform over distinct targets, as the evaluation's candidate lists draw their
    negatives uniformly from the catalogue: a popular title is no likelier a negative than a rare
    one. Draws are a pure function of (seed, step), so a resumed run draws what it would have."""

    def __init__(self, templates: list[str], targets: list[str]):
        self.row_group = np.empty(len(targets), dtype=np.int64)  # row -> its template's group
        self.row_target = np.empty(len(targets), dtype=np.int64)  # row -> its target's slot in the group
        group_of: dict[str, int] = {}
        slots: list[dict[str, int]] = []  # group -> {target text: slot}
        first_rows: list[list[int]] = []  # group -> the first row holding each slot's target
        for row, (template, target) in enumerate(zip(templates, targets)):
            group = group_of.setdefault(template, len(group_of))
            if group == len(slots):
                slots.append({})
                first_rows.append([])
            slot = slots[group].setdefault(target, len(slots[group]))
            if slot == len(first_rows[group]):
                first_rows[group].append(row)
            self.row_group[row], self.row_target[row] = group, slot
        self.group_members = [np.asarray(rows, dtype=np.int64) for rows in first_rows]
        self.group_of = group_of

    def distinct_targets(self, template: str) -> int:
        return len(self.group_members[self.group_of[template]])

    def draw(self, rows: np.ndarray, count: int, seed: int, step: int) -> np.ndarray:
        """[len(rows), count] row indices whose targets serve as each row's negatives. A template with
        fewer than count + 1 distinct targets repeats some (sampling with replacement then)."""
        rng = np.random.default_rng([int(seed), int(step), 0x4E45])  # its own stream: "NE"
        out = np.empty((len(rows), count), dtype=np.int64)
        for i, row in enumerate(rows):
            members = self.group_members[self.row_group[row]]
            own = self.row_target[row]
            others = len(members) - 1
            if others <= 0:
                out[i] = row  # nothing else to rank against: the row itself (a zero-gradient term)
                continue
            picks = rng.choice(others, size=count, replace=others < count)
            picks = picks + (picks >= own)  # skip the row's own target
            out[i] = members[picks]
        return out


# The column `instructrec mine-negatives` adds to train.parquet: each row's retrieved item ids.
MINED_COLUMN = "negative_ids"
MINED_SCORES_COLUMN = "negative_scores"  # the retriever's logit of each mined item, aligned with MINED_COLUMN
TARGET_SCORE_COLUMN = "target_score"  # the retriever's logit of the row's own target


def teacher_targets(teacher: np.ndarray, temperature: float, share: float = 1.0) -> np.ndarray:
    """Soft targets [B, K + 1] from teacher logits [B, K + 1] (the target's first): where every
    logit of a row is known, `share` x its softmax at `temperature` + (1 - share) x the one-hot
    target; else the one-hot target."""
    known = np.isfinite(teacher).all(axis=1)
    out = np.zeros_like(teacher, dtype=np.float64)
    out[:, 0] = 1.0
    if known.any():
        scaled = teacher[known] / temperature
        scaled = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        out[known] = share * scaled / scaled.sum(axis=1, keepdims=True) + (1.0 - share) * out[known]
    return out


class MinedNegativePool:
    """Retrieved negatives for each row (`train --rank-negatives-from mined`): the items a retriever
    ranked highest for the row's history (`instructrec mine-negatives`, column MINED_COLUMN), as
    titles of the same template's rows, so the ranking term trains what a reranker behind that
    retriever faces: telling the next item from the look-alikes it is served with. Each step draws
    `count` of a row's mined negatives uniformly; a row with fewer (product search rows, which
    have no history, or items never a target of the row's template) is filled from `fallback`'s
    uniform draw. Draws are a pure function of (seed, step), as NegativePool's.

    With the retriever's scores (`scores` aligned with `mined`, `target_scores` per row), draw_scored
    also gives each drawn row its teacher logits [target, negatives...]: NaN where a negative came
    from the fallback, whose items the retriever did not score."""

    def __init__(self, templates: list[str], target_item_ids: list[str | None], mined: list[list[str] | None],
                 fallback: NegativePool, scores: list[list[float] | None] | None = None,
                 target_scores: list[float | None] | None = None):
        self.fallback = fallback
        first_row: dict[tuple[str, str], int] = {}  # (template, item id) -> the first row with that target
        for row, (template, item) in enumerate(zip(templates, target_item_ids)):
            if item is not None:
                first_row.setdefault((template, item), row)
        self.row_negatives: list[np.ndarray] = []
        self.row_scores: list[np.ndarray] | None = [] if scores is not None else None
        self.target_scores = (np.array([np.nan if t is None else t for t in target_scores], dtype=np.float64)
                              if target_scores is not None else None)
        for row, items in enumerate(mined):
            own = target_item_ids[row] if row < len(target_item_ids) else None
            found: dict[int, float] = {}  # negative row -> its item's score, first occurrence kept
            row_scores = (scores[row] or ()) if scores is not None else ()
            for position, item in enumerate(items or ()):
                if item != own and (templates[row], item) in first_row:
                    found.setdefault(first_row[(templates[row], item)],
                                     row_scores[position] if position < len(row_scores) else np.nan)
            self.row_negatives.append(np.fromiter(found.keys(), dtype=np.int64, count=len(found)))
            if self.row_scores is not None:
                self.row_scores.append(np.fromiter(found.values(), dtype=np.float64, count=len(found)))

    def coverage(self, count: int) -> tuple[int, int]:
        """(rows with at least `count` mined negatives usable as titles, rows with some)."""
        sizes = np.array([len(n) for n in self.row_negatives])
        return int((sizes >= count).sum()), int((sizes > 0).sum())

    def draw(self, rows: np.ndarray, count: int, seed: int, step: int) -> np.ndarray:
        """[len(rows), count] row indices whose targets serve as each row's negatives."""
        return self.draw_scored(rows, count, seed, step)[0]

    def draw_scored(self, rows: np.ndarray, count: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """draw's indices and [len(rows), count + 1] teacher logits (the target's first; NaN where
        unknown, all NaN without scores)."""
        rng = np.random.default_rng([int(seed), int(step), 0x4D4E])  # its own stream: "MN"
        out = self.fallback.draw(rows, count, seed, step)
        teacher = np.full((len(rows), count + 1), np.nan)
        for i, row in enumerate(rows):
            mined = self.row_negatives[row] if row < len(self.row_negatives) else ()
            take = min(count, len(mined))
            if take:
                picked = rng.choice(len(mined), size=take, replace=False)
                out[i, :take] = mined[picked]
                if self.row_scores is not None:
                    teacher[i, 0] = self.target_scores[row]
                    teacher[i, 1:take + 1] = self.row_scores[row][picked]
        return out, teacher

"""`instructrec mine-negatives`: a training folder whose rows carry retrieved negatives.

The evaluation's hard-negative lists (and a nightly job behind a retriever) hold the items a
two-tower retriever ranks highest for the user's history: look-alikes of the next item. The
ranking term (`train --rank-negatives K`) draws its negatives uniformly from the catalogue by
default, which are mostly easy. This step fits the same two-tower retriever `instructrec eval`
fits (the user kind, on the prepared data's training sequences, early-stopped on its validation
lists) and stores, for every training row with a history, the `per_row` items it ranks highest
for that history, never an item the user interacted with (the row's target included): column
`negative_ids` of OUT/train.parquet, read by `train --rank-negatives-from mined`. With
`random_per_row` M, M items drawn uniformly from the rest of the catalogue (same exclusions) follow
the retrieved ones, so that the ranking term's draws mix look-alikes with the easy negatives of
sequential recommendation lists; with `per_row` 0 they are the only ones (the retriever's
preferences among easy items, without its look-alikes). Every stored item carries the retriever's
score for the history (`negative_scores`, cosine / temperature, the logits it was trained with),
and the row's target its own (`target_score`): the soft targets of `train --rank-distill`.

A row's history is the user's training sequence before the row's target (its first occurrence);
rows without one (product search has no user, or the target opens the sequence) get an empty list.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from instructrec.engine.errors import InputError

from .tune_data import MINED_COLUMN, MINED_SCORES_COLUMN, TARGET_SCORE_COLUMN

log = logging.getLogger(__name__)

# Validation lists the retriever early-stops on, and its epoch cap: `instructrec eval`'s
# --baseline-valid and the two-tower's max_epochs of docs/results.md's step 7.
RETRIEVER_VALID = 3000
RETRIEVER_MAX_EPOCHS = 6


def row_histories(user_ids: list, target_ids: list, sequences) -> list[list[str] | None]:
    """Each row's history: the user's training items before the row's target (its first
    occurrence in the sequence); None where the row has no user, the user no training sequence,
    the target is not in it, or nothing precedes it."""
    out: list[list[str] | None] = []
    for user, target in zip(user_ids, target_ids):
        sequence = sequences.get(user) if user is not None else None
        if not sequence or target not in sequence:
            out.append(None)
            continue
        position = list(sequence).index(target)
        out.append(list(sequence[:position]) or None)
    return out


def uniform_items(catalog_ids: list[str], exclude: set[str], count: int, rng) -> list[str]:
    """`count` distinct items drawn uniformly from `catalog_ids` outside `exclude` (fewer only
    where fewer remain)."""
    chosen: dict[str, None] = {}
    room = len(catalog_ids) - len(exclude)
    count = min(count, max(room, 0))
    while len(chosen) < count:
        for index in rng.integers(0, len(catalog_ids), size=2 * (count - len(chosen))):
            item = catalog_ids[index]
            if item not in exclude and item not in chosen:
                chosen[item] = None
                if len(chosen) == count:
                    break
    return list(chosen)


def mine_negatives(instructions: Path, data: Path, out: Path, per_row: int = 20, seed: int = 0,
                   max_epochs: int = RETRIEVER_MAX_EPOCHS, valid_lists: int = RETRIEVER_VALID,
                   random_per_row: int = 0) -> dict:
    """Write OUT/train.parquet (INSTRUCTIONS' train.parquet plus `negative_ids`, `negative_scores`
    and `target_score`), link its valid and test splits, and write OUT/negatives.json (counts, the
    retriever's fit). Returns that report."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .baselines import RankingRequest, TwoTowerRetriever, load_prepared
    from .baselines.two_tower import retrieve_hard_negatives
    from .eval_domain import sample_labeled

    instructions, data, out = Path(instructions), Path(data), Path(out)
    if not isinstance(per_row, int) or isinstance(per_row, bool) or per_row < 0:
        raise InputError("per_row", f"must be a number of retrieved negatives >= 0, got {per_row!r}", "e.g. 20")
    if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
        raise InputError("max_epochs", f"must be a positive number of epochs, got {max_epochs!r}", "e.g. 6")
    if not isinstance(random_per_row, int) or isinstance(random_per_row, bool) or random_per_row < 0:
        raise InputError("random_per_row", f"must be a number of uniform negatives >= 0, got {random_per_row!r}",
                         "e.g. 20, or 0 for retrieved negatives only")
    if per_row == 0 == random_per_row:
        raise InputError("per_row", "0 retrieved and 0 uniform negatives per row would store nothing",
                         "set --per-row (retrieved) or --random-per-row (uniform), or both")
    source = instructions / "train.parquet"
    if not source.is_file():
        raise InputError("instructions", f"{source} does not exist",
                         "point --instructions at a folder of `instructrec instructions build` or `eval-train-set`")
    if out.resolve() == instructions.resolve():
        raise InputError("out", f"{out} is the --instructions folder itself",
                         "write the mined folder elsewhere: its train.parquet would replace the original")
    table = pq.read_table(source)
    missing = [c for c in ("user_id", "target_item_id") if c not in table.column_names]
    if missing:
        raise InputError("instructions", f"{source} lacks column(s) {', '.join(missing)}",
                         "rebuild it with `instructrec instructions build`")
    if MINED_COLUMN in table.column_names:
        raise InputError("instructions", f"{source} already holds mined negatives ({MINED_COLUMN})",
                         "mine from the folder it was mined from")
    started = time.perf_counter()
    prepared = load_prepared(data)
    catalog = prepared.train.items
    users, targets = table.column("user_id").to_pylist(), table.column("target_item_id").to_pylist()
    histories = row_histories(users, targets, prepared.train.sequences)
    unknown = sum(1 for h in histories if h is not None for i in h if i not in catalog.index)
    if unknown or not any(h is not None for h in histories):
        why = f"{unknown} history items missing from its catalogue" if unknown else "no row's user and target are in it"
        raise InputError("data", f"{data} is not the prepared data {instructions} was built from: {why}",
                         "pass the --data folder the instructions were built from")
    if per_row > len(catalog) - 1:
        raise InputError("per_row", f"{per_row} negatives asked from a catalogue of {len(catalog)} items", "lower it")

    # Every item a user interacted with (train, valid and test) is never their negative.
    interacted: dict[str, set[str]] = {user: set(seq) for user, seq in prepared.train.sequences.items()}
    for labeled in (*prepared.valid, *prepared.test):
        interacted.setdefault(labeled.request.user_id, set()).update((*labeled.request.history, labeled.target_item_id))

    retriever = TwoTowerRetriever(kind="user", seed=seed, max_epochs=max_epochs)
    valid = sample_labeled(prepared.valid, valid_lists, seed)
    report = retriever.fit(prepared.train, valid)
    log.info("mine-negatives: two-tower fitted in %.1fs (best epoch %d, validation %s %.4f)",
             report.train_seconds, report.best_epoch, report.metric, report.best_valid)

    rows = [i for i, h in enumerate(histories) if h is not None]
    exclude = [interacted.get(users[i], set()) | set(histories[i]) | {targets[i]} for i in rows]
    # Users whose interactions leave fewer than per_row items get no negatives rather than an error.
    roomy = [j for j, skip in enumerate(exclude) if len(catalog) - len(skip) >= per_row]
    mined: list[list[str]] = [[] for _ in range(table.num_rows)]
    mined_scores: list[list[float]] = [[] for _ in range(table.num_rows)]
    target_scores: list[float | None] = [None] * table.num_rows
    catalog_ids = sorted(catalog.index)
    rng = np.random.default_rng([seed, 0x554E])  # the uniform draws' own stream: "UN"
    chunk = 8192
    for start in range(0, len(roomy), chunk):
        part = roomy[start:start + chunk]
        # per_row 0: uniform items only, still scored by the retriever (its preferences among easy items).
        found = (retrieve_hard_negatives(retriever, [histories[rows[j]] for j in part], [exclude[j] for j in part],
                                         k=per_row) if per_row else [[] for _ in part])
        if random_per_row:
            found = [negatives + uniform_items(catalog_ids, exclude[j] | set(negatives), random_per_row, rng)
                     for j, negatives in zip(part, found)]
        # The retriever's logits for the stored items and the target, its target first in each list.
        scored = retriever.score([RankingRequest("", tuple(histories[rows[j]]), (targets[rows[j]], *negatives))
                                  for j, negatives in zip(part, found)])
        for j, negatives, logits in zip(part, found, scored):
            mined[rows[j]] = negatives
            target_scores[rows[j]] = float(logits[0])
            mined_scores[rows[j]] = [float(x) for x in logits[1:len(negatives) + 1]]
        log.info("mine-negatives: %d of %d rows with a history", min(start + chunk, len(roomy)), len(rows))

    out.mkdir(parents=True, exist_ok=True)
    table = (table.append_column(MINED_COLUMN, pa.array(mined, pa.list_(pa.string())))
             .append_column(MINED_SCORES_COLUMN, pa.array(mined_scores, pa.list_(pa.float64())))
             .append_column(TARGET_SCORE_COLUMN, pa.array(target_scores, pa.float64())))
    pq.write_table(table, out / "train.parquet")
    for name in ("valid.parquet", "test.parquet"):
        link, target = out / name, instructions / name
        if target.exists() and not link.exists():
            link.symlink_to(target.resolve())
    summary = {"rows": table.num_rows, "rows_with_negatives": sum(1 for m in mined if m), "per_row": per_row,
               "random_per_row": random_per_row,
               "rows_without_history": table.num_rows - len(rows), "seed": seed,
               "instructions": str(instructions), "data": str(data),
               "retriever": {"kind": "two-tower (user)", "best_epoch": report.best_epoch, "metric": report.metric,
                             "best_valid": report.best_valid, "max_epochs": max_epochs, "valid_lists": len(valid),
                             "train_seconds": round(report.train_seconds, 1)},
               "seconds": round(time.perf_counter() - started, 1)}
    (out / "negatives.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

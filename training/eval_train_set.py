"""`instructrec eval-train-set`: the evaluated model's training folder, without a held-out
instruction type and without rows whose target is a product-search evaluation item."""

from __future__ import annotations

import json
import re
from pathlib import Path

from instructrec.engine.errors import InputError


def parse_instruction_type(text: str) -> tuple[str, str]:
    """'P2+I1' -> ('P2', 'I1'); 'P1+P2+I1' -> ('P1+P2', 'I1')."""
    pref, sep, intent = text.rpartition("+")
    if not sep or not pref.startswith("P") or not re.fullmatch(r"I[0-2]", intent):
        raise InputError("hold_out", f"{text!r} is not PREFERENCE+INTENTION", "write e.g. P2+I1 or P1+I1")
    return pref, intent


def restrict_training_set(instructions: Path, prepared: Path, out: Path, hold_out: str | None) -> dict:
    """A training folder for the evaluated model: train.parquet without (a) the rows of the held-out
    instruction type `hold_out` (all task forms) and (b) the rows whose target is a product-search
    valid/test item, so product search is evaluated on items the model never generated in training
    (the build makes only product-search train rows follow the item split). valid/test link back."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    train = pq.read_table(Path(instructions) / "train.parquet")
    splits = pq.read_table(Path(prepared) / "search_splits.parquet")
    held_items = pc.filter(splits["item_id"], pc.not_equal(splits["split"], "train"))
    keep = pc.invert(pc.fill_null(pc.is_in(train["target_item_id"], value_set=held_items), False))
    report = {"rows_in": train.num_rows,
              "dropped_search_eval_targets": train.num_rows - pc.sum(keep).as_py()}
    if hold_out:
        pref, intent = parse_instruction_type(hold_out)
        held = pc.and_(pc.equal(train["preference"], pref), pc.equal(train["intention"], intent))
        report["held_out"] = hold_out
        report["dropped_held_out"] = pc.sum(pc.and_(held, keep)).as_py()
        keep = pc.and_(keep, pc.invert(held))
    kept = train.filter(keep)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(kept, out / "train.parquet")
    for name in ("valid.parquet", "test.parquet"):
        link = out / name
        if not link.exists():
            link.symlink_to((Path(instructions) / name).resolve())
    report["rows_out"] = kept.num_rows
    (out / "restrict.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

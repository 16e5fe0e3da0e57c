"""The instruction dataset report: per-split figures shaped like Table 2 of the original work
(stats.json) and their Markdown table (stats.md)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Mapping

from instructrec.engine.templates import REGISTRY, Intention, Preference, TemplateGroup

from .build_tables import SPLITS


def split_stats(rows: Mapping[str, list]) -> dict:
    """Table-2 style figures for one split's columns."""
    n = len(rows["instruction"])
    templates_by_group: dict[str, set[str]] = defaultdict(set)
    rows_by_group: Counter[str] = Counter()
    for template_id in rows["template"]:
        group = REGISTRY[template_id].group.value
        templates_by_group[group].add(template_id)
        rows_by_group[group] += 1
    words = [len(text.split()) for text in rows["instruction"]]
    target_words = [len(text.split()) for text in rows["target"]]
    groups = [g.value for g in TemplateGroup]
    return {
        "instructions": n,
        "with_preference": sum(1 for p in rows["preference"] if p != Preference.NONE.value),
        "with_intention": sum(1 for i in rows["intention"] if i != Intention.NONE.value),
        "mean_instruction_words": round(sum(words) / n, 2) if n else 0.0,
        "mean_target_words": round(sum(target_words) / n, 2) if n else 0.0,
        "coarse_templates": len(set(rows["template"])),
        "coarse_templates_by_group": {g: len(templates_by_group.get(g, ())) for g in groups},
        "instructions_by_group": {g: rows_by_group.get(g, 0) for g in groups},
        "by_preference": dict(sorted(Counter(rows["preference"]).items())),
        "by_intention": dict(sorted(Counter(rows["intention"]).items())),
        "by_task": dict(sorted(Counter(rows["task"]).items())),
        "by_strategy": dict(sorted(Counter(rows["strategy"]).items())),
        "by_scenario": dict(sorted(Counter(rows["scenario"]).items())),
        "users": len({u for u in rows["user_id"] if u is not None}),
        "target_items": len(set(rows["target_item_id"])),
        "yes_targets": sum(1 for t, task in zip(rows["target"], rows["task"]) if task == "T0" and t == "Yes"),
        "no_targets": sum(1 for t, task in zip(rows["target"], rows["task"]) if task == "T0" and t == "No"),
    }


def stats_markdown(report: dict) -> str:
    stats = report["splits"]
    columns = [s for s in SPLITS if s in stats]
    lines = [f"# Instruction dataset ({report['annotator']}, seed {report['seed']})", "",
             "| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]

    def row(label: str, get) -> None:
        lines.append(f"| {label} | " + " | ".join(str(get(stats[s])) for s in columns) + " |")

    row("# fine-grained instructions", lambda s: f"{s['instructions']:,}")
    row("# with preferences (P1/P2)", lambda s: f"{s['with_preference']:,}")
    row("# with intentions (I1/I2)", lambda s: f"{s['with_intention']:,}")
    row("mean words per instruction", lambda s: f"{s['mean_instruction_words']:.2f}")
    row("mean words per target", lambda s: f"{s['mean_target_words']:.2f}")
    row("# coarse templates used", lambda s: s["coarse_templates"])
    for group in TemplateGroup:
        row(f"- {group.value.replace('_', '-')} templates",
            lambda s, g=group.value: s["coarse_templates_by_group"][g])
    for group in TemplateGroup:
        row(f"# {group.value.replace('_', '-')} instructions",
            lambda s, g=group.value: f"{s['instructions_by_group'][g]:,}")
    row("# users", lambda s: f"{s['users']:,}")
    row("T0 Yes / No", lambda s: f"{s['yes_targets']} / {s['no_targets']}")
    lines += ["", "Rows by task form: " + "; ".join(f"{s}: {stats[s]['by_task']}" for s in columns),
              "Rows by strategy: " + "; ".join(f"{s}: {stats[s]['by_strategy']}" for s in columns)]
    if report.get("skipped"):
        lines += ["", "Skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items()))]
    return "\n".join(lines) + "\n"

"""The template registry: coverage derived from the registry itself, every template rendering with
its slots, attribute round-trips through describe_templates, and the definition checks."""

from __future__ import annotations

import json
import string
from collections import Counter

import pytest

from instructrec.engine.errors import InputError, UnknownTemplateError
from instructrec.engine.formatting import render_template
from instructrec.engine.templates import (
    DEFAULT_TEMPLATE_IDS, REGISTRY, Intention, Preference, Scenario, Strategy, TargetKind, TaskForm, Template,
    TemplateDefinitionError, TemplateGroup, describe_templates, get_template,
)

# One record holding every slot any template can name; each template takes what it needs.
HISTORY = ["Retro Kart Racer", "Puzzle Tower Deluxe", "Space Trader 2", "Wireless Arcade Stick"]
CANDIDATES = ["Galaxy Miner", "Harbor Fishing Sim", "Neon Drift Turbo", "Castle Builder Kids"]
RECORD = {
    "history": HISTORY,
    "preference": "fast arcade racing and retro pixel art",
    "intention": "something exciting to play with friends on the couch",
    "context": "a rainy Saturday evening at home",
    "candidates": CANDIDATES,
    "item": "Neon Drift Turbo",
    "item_a": "Harbor Fishing Sim",
    "item_b": "Neon Drift Turbo",
    "target_title": "Neon Drift Turbo",
    "target_categories": "Video Games, Racing",
    "label": True,
}


def formatter_fields(text: str) -> list[str]:
    """Placeholders found by the standard library's format parser (an independent reading)."""
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def test_registry_covers_the_original_ground():
    templates = list(REGISTRY.values())
    groups = Counter(template.group for template in templates)
    assert len(templates) >= 39
    assert groups[TemplateGroup.PREFERENCE_RELATED] >= 17
    assert groups[TemplateGroup.INTENTION_RELATED] >= 9
    assert groups[TemplateGroup.COMBINED] >= 13
    # The groups follow from P and I alone.
    for template in templates:
        has_preference = template.preference is not Preference.NONE
        has_intention = template.intention is not Intention.NONE
        assert has_preference or has_intention, template.id
        expected = (TemplateGroup.COMBINED if has_preference and has_intention else
                    TemplateGroup.PREFERENCE_RELATED if has_preference else TemplateGroup.INTENTION_RELATED)
        assert template.group is expected
    assert {template.strategy for template in templates} == set(Strategy)
    assert {template.task for template in templates} == set(TaskForm)
    assert {template.scenario for template in templates} == set(Scenario)
    assert {template.preference for template in templates} == set(Preference)
    assert {template.intention for template in templates} == set(Intention)
    assert sum(template.has_context for template in templates) >= 3
    pairwise = [template for template in templates if template.task is TaskForm.PAIRWISE]
    assert pairwise and all(template.target_kind is TargetKind.CHOICE for template in pairwise)


def test_ids_are_unique_stable_strings():
    ids = [template.id for template in REGISTRY.values()]
    assert len(ids) == len(set(ids))
    for template_id, template in REGISTRY.items():
        assert template.id == template_id
        family, number = template_id.rsplit("-", 1)
        assert family in {"seq-rec", "prod-search", "pers-search"} and number.isdigit()


@pytest.mark.parametrize("template_id", list(REGISTRY))
def test_every_template_renders_with_its_slots(template_id):
    template = REGISTRY[template_id]
    rendered = render_template(template, RECORD)
    assert formatter_fields(rendered.source) == []
    assert set(formatter_fields(template.source)) == set(template.slots)
    for name in template.slots:
        if name == "history":
            assert "; ".join(HISTORY) in rendered.source
        elif name == "candidates":
            assert "\n".join(f"{n}. {title}" for n, title in enumerate(CANDIDATES, 1)) in rendered.source
        else:
            assert RECORD[name] in rendered.source
    expected_target = {
        TargetKind.TITLE: "Neon Drift Turbo",
        TargetKind.CHOICE: "Neon Drift Turbo",
        TargetKind.YES_NO: "Yes",
        TargetKind.INTENTION: RECORD["intention"],
        TargetKind.PREFERENCE: RECORD["preference"],
        TargetKind.HISTORY: "Wireless Arcade Stick",  # the newest past item
    }
    if template.target_kind is TargetKind.REASONING:
        assert rendered.target.endswith("Neon Drift Turbo.")
        assert all(str(RECORD[name]) in rendered.target for name in template.target_slots)
    else:
        assert rendered.target == expected_target[template.target_kind]
    assert rendered.dropped_history == 0
    # Without the target's slots the source still renders and the target is left out.
    target_only = set(template.target_slots) - set(template.slots)
    without_target = {name: value for name, value in RECORD.items() if name not in target_only}
    assert render_template(template, without_target).target is None


def test_describe_templates_round_trips_attributes():
    described = describe_templates()
    json.dumps(described)  # the CLI prints it as JSON
    assert [row["id"] for row in described] == list(REGISTRY)
    for row in described:
        template = get_template(row["id"])
        assert Preference(row["P"]) is template.preference
        assert Intention(row["I"]) is template.intention
        assert TaskForm(row["T"]) is template.task
        assert Scenario(row["scenario"]) is template.scenario
        assert Strategy(row["strategy"]) is template.strategy
        assert TargetKind(row["target_kind"]) is template.target_kind
        assert TemplateGroup(row["group"]) is template.group
        assert row["slots"] == formatter_fields(row["source"])
        assert row["lists_candidates"] == ("candidates" in row["slots"])
        assert row["context"] == ("context" in row["slots"])
        assert row["description"]
        rebuilt = Template(row["id"], template.preference, template.intention, template.task, template.scenario,
                           template.strategy, row["source"], template.target_kind, row["description"],
                           target_pattern=row["target"] if template.target_kind is TargetKind.REASONING else None)
        assert rebuilt == template


@pytest.mark.parametrize("template_id", [t.id for t in REGISTRY.values() if t.task is TaskForm.RERANKING])
def test_reranking_targets_are_among_the_listed_candidates(template_id):
    template = REGISTRY[template_id]
    for position, title in enumerate(CANDIDATES, start=1):
        rendered = render_template(template, {**RECORD, "target_title": title})
        listed = [line.split(". ", 1)[1] for line in rendered.source.splitlines()[1:]]
        assert listed == CANDIDATES
        assert f"\n{position}. {title}" in rendered.source
        if template.target_kind is TargetKind.TITLE:
            assert rendered.target in listed and rendered.target == title
        else:  # a reasoning target names the chosen candidate last
            assert rendered.target.endswith(f" {title}.")
    with pytest.raises(InputError) as caught:
        render_template(template, {**RECORD, "target_title": "Not Listed Anywhere"})
    assert caught.value.field == "target_title"


def test_pointwise_and_pairwise_targets():
    pointwise = next(t for t in REGISTRY.values() if t.task is TaskForm.POINTWISE)
    assert render_template(pointwise, {**RECORD, "label": False}).target == "No"
    assert render_template(pointwise, {**RECORD, "label": True}).target == "Yes"
    with pytest.raises(InputError) as caught:
        render_template(pointwise, {**RECORD, "label": "yes"})
    assert caught.value.field == "label"
    pairwise = next(t for t in REGISTRY.values() if t.task is TaskForm.PAIRWISE)
    assert render_template(pairwise, {**RECORD, "target_title": "Harbor Fishing Sim"}).target == "Harbor Fishing Sim"
    with pytest.raises(InputError) as caught:
        render_template(pairwise, {**RECORD, "target_title": "Galaxy Miner"})
    assert caught.value.field == "target_title"


def test_unknown_template_names_close_ids():
    with pytest.raises(UnknownTemplateError) as caught:
        get_template("seq-rec-1")
    error = caught.value
    assert error.field == "template" and error.kind == "unknown_template"
    assert "seq-rec-01" in str(error)
    with pytest.raises(UnknownTemplateError) as caught:
        get_template("zzz")
    assert "seq-rec-01" in str(caught.value) and "prod-search-01" in str(caught.value)


def test_missing_slot_names_the_slot():
    with pytest.raises(InputError) as caught:
        render_template("pers-search-01", {"history": HISTORY})
    assert caught.value.field == "intention"
    assert "pers-search-01" in str(caught.value)


@pytest.mark.parametrize("source, task, target_kind, strategy, problem", [
    ("Past items: {history}. Pick one.", TaskForm.RERANKING, TargetKind.TITLE, Strategy.PLAIN, "T3"),
    ("Past items: {history}. Is {target_title} right?", TaskForm.MATCHING, TargetKind.TITLE, Strategy.PLAIN,
     "give away"),
    ("Past items: {history}. Next?", TaskForm.MATCHING, TargetKind.INTENTION, Strategy.PLAIN, "strategy"),
    ("Past items: {history} and {history}.", TaskForm.MATCHING, TargetKind.TITLE, Strategy.PLAIN, "more than once"),
    ("Past items: {history}. Need: {intention}.", TaskForm.MATCHING, TargetKind.TITLE, Strategy.PLAIN,
     "contradict intention"),
])
def test_contradicting_definitions_are_refused(source, task, target_kind, strategy, problem):
    with pytest.raises(TemplateDefinitionError, match=problem):
        Template("test-case-01", Preference.HISTORY, Intention.NONE, task, Scenario.RECOMMENDATION, strategy,
                 source, target_kind, "a contradicting definition")


def test_defaults_cover_every_field_combination():
    preferences = [Preference.HISTORY, Preference.EXPLICIT, Preference.HISTORY_AND_EXPLICIT, Preference.NONE]
    for preference in preferences:
        for intention in Intention:
            for with_context in (False, True):
                key = (preference, intention, with_context)
                if preference is Preference.NONE and intention is Intention.NONE:
                    assert key not in DEFAULT_TEMPLATE_IDS
                    continue
                template = REGISTRY[DEFAULT_TEMPLATE_IDS[key]]
                assert (template.preference, template.intention, template.has_context) == key
                assert template.task is TaskForm.MATCHING and template.target_kind is TargetKind.TITLE
                assert template.strategy is Strategy.PLAIN and not template.lists_candidates

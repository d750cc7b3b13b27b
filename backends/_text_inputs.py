"""What the text classification family reads and asks: an object's text, the choices' hypotheses, token windows.

No model here. The text is what the annotator sees: Text as is, HyperText's visible text (no markup,
scripts or hidden parts, serving/results/hypertext.py through the generation family's reader),
Paragraphs as the whole dialogue in `speaker: text` lines, Table as `key: value` lines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends._llm_prompts import content_of
from serving.contract import Item, Target

DEFAULT_HYPOTHESIS = "This example is {}."  # transformers' zero-shot-classification default
TEMPLATE_ATTR = "model_hypothesis"


def text_of(item: Item) -> str:
    """Return the text of the item's object as the labeling page shows it."""
    if item.obj.tag == "Table":
        return table_text(item.value if item.value is not None else item.text)
    return content_of(item)


def table_text(value: Any) -> str:
    """Return a Table's rows as `key: value` lines (a JSON string is read first)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, Mapping):
        return "\n".join(f"{k}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "\n".join(table_text(row) if isinstance(row, (Mapping, list)) else _cell(row) for row in value)
    return "" if value is None else str(value)


def _cell(value: Any) -> str:
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def is_multiple(target: Target) -> bool:
    """Return True when the tag takes several choices (choice="multiple")."""
    return target.option("choice", "single").strip().lower() == "multiple"


@dataclass(frozen=True)
class Candidates:
    """What one tag chooses among: its options (config names or Taxonomy paths) and their hypotheses."""

    names: tuple[str, ...]  # the config's label of each option (a Taxonomy path's last node)
    paths: tuple[tuple[str, ...], ...]  # Taxonomy: each option's path; Choices: (name,)
    hypotheses: tuple[tuple[str, ...], ...]  # per option, its phrases filled into the template


def template_of(target: Target) -> str:
    """Return the tag's hypothesis template with `{}` standing for the choice."""
    template = target.option(TEMPLATE_ATTR, "").strip() or DEFAULT_HYPOTHESIS
    template = template.replace("{label}", "{}")
    return template if "{}" in template else template + " {}"


def phrases_of(target: Target, label: str) -> tuple[str, ...]:
    """Return the words that stand for one label: its predicted_values, else its readable value."""
    control = target.control
    raw = control.predicted_values.get(label) or (control.label_values.get(label, label),)
    return tuple(p.strip() for p in raw if p.strip()) or (label,)


def candidates(target: Target) -> Candidates:
    """Return a tag's options: its choices, or a Taxonomy's leaf paths (the phrase names the leaf)."""
    labels = target.label_map.config_labels
    template = template_of(target)
    if target.control.tag != "Taxonomy" or not target.control.paths:
        hyps = tuple(tuple(template.format(p) for p in phrases_of(target, c)) for c in labels)
        return Candidates(tuple(labels), tuple((c,) for c in labels), hyps)
    allowed = set(labels)
    paths = target.control.paths
    leaves = [
        p for p in paths if p[-1] in allowed and not any(len(q) > len(p) and q[: len(p)] == p for q in paths)
    ]
    counts: dict[str, int] = {}
    for path in leaves:
        counts[path[-1]] = counts.get(path[-1], 0) + 1
    phrases: list[tuple[str, ...]] = []
    for path in leaves:
        words = phrases_of(target, path[-1])
        if counts[path[-1]] > 1 and len(path) > 1:
            # the same leaf under two parents: the parent tells them apart
            parent = target.control.label_values.get(path[-2], path[-2])
            words = tuple(f"{w} ({parent})" for w in words)
        phrases.append(tuple(template.format(w) for w in words))
    return Candidates(tuple(p[-1] for p in leaves), tuple(leaves), tuple(phrases))


def windows(offsets: Sequence[tuple[int, int]], text: str, budget: int, max_windows: int) -> list[str]:
    """Cut a text into windows of at most `budget` tokens (a quarter overlapping), at most `max_windows`.

    `offsets` are the tokens' character spans. A text longer than max_windows windows is covered by
    windows spread evenly over it (its start, its end and between), so every part weighs in.
    """
    n = len(offsets)
    if n <= budget or budget <= 0:
        return [text]
    step = max(1, budget - budget // 4)
    starts = list(range(0, n - budget + step, step))
    starts = [min(s, n - budget) for s in starts]
    starts = sorted(set(starts))
    if len(starts) > max_windows:
        last = len(starts) - 1
        starts = (
            [starts[round(i * last / (max_windows - 1))] for i in range(max_windows)]
            if max_windows > 1
            else [0]
        )
    return [text[offsets[s][0] : offsets[min(n, s + budget) - 1][1]] for s in starts]

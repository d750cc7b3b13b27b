"""Templated NER texts with known spans: people, places and organisations spaCy knows, and invented drugs.

`Drug` is a label no pretrained model has: training must teach it. The other three are what the
pretrained model already predicts (PERSON, GPE, ORG), so their F1 before and after training
tells whether training made it forget.
"""

from __future__ import annotations

import random
from typing import Any

LABELS = ("Person", "Organization", "Location", "Drug")
CONFIG = """<View>
  <Labels name="label" toName="text">
    <Label value="Person" background="red"/>
    <Label value="Organization" background="darkorange"/>
    <Label value="Location" background="orange"/>
    <Label value="Drug" background="green"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""

PEOPLE = (
    "John Smith",
    "Maria Garcia",
    "David Miller",
    "Sarah Johnson",
    "Michael Brown",
    "Emily Davis",
    "James Wilson",
    "Laura Martinez",
    "Robert Taylor",
    "Anna Thompson",
)
CITIES = (
    "Boston",
    "Chicago",
    "Denver",
    "Seattle",
    "London",
    "Paris",
    "Madrid",
    "Berlin",
    "Toronto",
    "Dallas",
)
ORGS = ("Google", "Microsoft", "Pfizer", "the World Health Organization", "Harvard University", "Amazon")
DRUGS = (
    "Zolvarex",
    "Metraquin",
    "Bravocel",
    "Duxitrol",
    "Fenorva",
    "Lumitex",
    "Caprozine",
    "Velotran",
    "Quendamil",
    "Orixapam",
    "Tralonex",
    "Sumavir",
)
TEMPLATES = (
    "{person} was prescribed {drug} at a clinic in {city}.",
    "Doctors in {city} say {drug} helped {person} recover quickly.",
    "After two weeks on {drug}, {person} flew back to {city}.",
    "The pharmacy in {city} ran out of {drug}, according to {person}.",
    "{person} takes {drug} every morning before work at {org}.",
    "Researchers at {org} tested {drug} on patients in {city}.",
    "{person} from {org} said that {drug} is not approved in {city} yet.",
    "A nurse in {city} gave {person} a dose of {drug} on Monday.",
)


def make_text(template: str, values: dict[str, str]) -> tuple[str, list[tuple[int, int, str]]]:
    """Fill a template and return the text with the exact spans of every filled slot."""
    label_of = {"person": "Person", "city": "Location", "org": "Organization", "drug": "Drug"}
    text, spans = "", []
    rest = template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        slot, _, rest = tail.partition("}")
        text += head
        value = values[slot]
        start = len(text)
        text += value
        # "the World Health Organization": the article is not part of the entity
        offset = 4 if value.startswith("the ") else 0
        spans.append((start + offset, start + len(value), label_of[slot]))
    text += rest
    return text, spans


def corpus(n: int, seed: int, drugs: tuple[str, ...] = DRUGS) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """Return n templated texts (deterministic per seed) with their spans."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        template = TEMPLATES[i % len(TEMPLATES)]
        values = {
            "person": rng.choice(PEOPLE),
            "city": rng.choice(CITIES),
            "org": rng.choice(ORGS),
            "drug": rng.choice(drugs),
        }
        out.append(make_text(template, values))
    return out


def annotation_result(
    text: str, spans: list[tuple[int, int, str]], from_name: str = "label"
) -> list[dict[str, Any]]:
    """Return a Label Studio annotation result for the spans of a text."""
    return [
        {
            "id": f"s{k}",
            "from_name": from_name,
            "to_name": "text",
            "type": "labels",
            "value": {"start": s, "end": e, "text": text[s:e], "labels": [label]},
        }
        for k, (s, e, label) in enumerate(spans)
    ]


def export(items: list[tuple[str, list[tuple[int, int, str]]]], first_id: int = 1) -> list[dict[str, Any]]:
    """Return a Label Studio JSON export of the texts, each with one annotation of its spans."""
    return [
        {
            "id": first_id + i,
            "data": {"text": text},
            "annotations": [
                {
                    "id": 1000 + i,
                    "result": annotation_result(text, spans),
                    "was_cancelled": False,
                    "created_at": "2026-11-29T10:00:00Z",
                    "updated_at": "2026-11-29T10:00:00Z",
                }
            ],
        }
        for i, (text, spans) in enumerate(items)
    ]


def f1(
    gold: list[set[tuple[int, int, str]]], found: list[set[tuple[int, int, str]]], label: str | None
) -> float:
    """Return exact-span micro F1 over the texts, for one label or (None) for all."""
    tp = fp = fn = 0
    for g, f in zip(gold, found, strict=True):
        gs = {s for s in g if label is None or s[2] == label}
        fs = {s for s in f if label is None or s[2] == label}
        tp, fp, fn = tp + len(gs & fs), fp + len(fs - gs), fn + len(gs - fs)
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)

"""The validator on HyperText XPath ranges and Paragraphs ranges (the troubleshooting page's errors)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from serving.results.schema import ConfigSchema
from serving.results.validation.checks import check_items, filter_valid

CONFIG = """<View>
  <HyperText name="html" value="$html"/>
  <HyperTextLabels name="ner" toName="html"><Label value="Person"/><Label value="Location"/></HyperTextLabels>
  <HyperText name="page" value="$page" valueType="url"/>
  <Labels name="plain" toName="page"><Label value="Person"/></Labels>
  <Paragraphs name="dialogue" value="$dialogue" textKey="line"/>
  <ParagraphLabels name="pl" toName="dialogue"><Label value="Person"/><Label value="Location"/></ParagraphLabels>
</View>"""
HTML = "<p>Good news 😀 everyone: Barack <b>Obama</b> met us in Paris.</p>"
DATA = {
    "html": HTML,
    "page": "https://example.com/page.html",
    "dialogue": [
        {"author": "A", "line": "Hello 😀 I met Barack Obama."},
        {"author": "B", "line": "In Paris."},
    ],
}
GOOD_HT = {
    "id": "r1",
    "from_name": "ner",
    "to_name": "html",
    "type": "hypertextlabels",
    "value": {
        "start": "/p[1]/text()[1]",
        "startOffset": 23,
        "end": "/p[1]/b[1]/text()[1]",
        "endOffset": 5,
        "globalOffsets": {"start": 22, "end": 34},
        "text": "Barack Obama",
        "hypertextlabels": ["Person"],
    },
}
GOOD_P = {
    "id": "r2",
    "from_name": "pl",
    "to_name": "dialogue",
    "type": "paragraphlabels",
    "value": {
        "start": "0",
        "end": "0",
        "startOffset": 15,
        "endOffset": 27,
        "text": "Barack Obama",
        "paragraphlabels": ["Person"],
    },
}


def _codes(item: dict[str, Any], data: dict[str, Any] = DATA) -> list[tuple[str, str]]:
    return [(p.code, p.severity) for p in check_items(ConfigSchema.from_config(CONFIG), [item], data)]


def _with(item: dict[str, Any], **value: Any) -> dict[str, Any]:
    out = copy.deepcopy(item)
    out["value"].update(value)
    return out


def test_good_ranges_pass() -> None:
    assert _codes(GOOD_HT) == []
    assert _codes(GOOD_P) == []
    across = _with(GOOD_P, start="0", end="1", startOffset=15, endOffset=8, text="Barack Obama.In Paris")
    assert _codes(across) == []


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"start": "/p[2]/text()[1]"}, "xpath_not_found"),
        ({"end": "/div[1]/p[1]/b[1]/text()[1]"}, "xpath_not_found"),
        ({"endOffset": 6}, "offset_outside_node"),
        ({"startOffset": -1}, "offset_outside_node"),
        ({"startOffset": 22}, "span_mismatch"),  # code points where UTF-16 units are due
        ({"text": "Barack Obama met"}, "span_mismatch"),
        ({"start": 3}, "bad_span"),
        ({"startOffset": "23"}, "bad_span"),
        ({"globalOffsets": {"start": "a"}}, "bad_span"),
        ({"end": "/p[1]/text()[1]", "endOffset": 2}, "bad_span"),  # reversed
    ],
)
def test_hypertext_errors(change: dict[str, Any], code: str) -> None:
    codes = _codes(_with(GOOD_HT, **change))
    assert (code, "error") in codes, codes


def test_hypertext_global_offsets_mismatch_is_a_warning_and_urls_are_not_fetched() -> None:
    assert _codes(_with(GOOD_HT, globalOffsets={"start": 23, "end": 35})) == [
        ("global_offsets_mismatch", "warning")
    ]
    on_url = {**copy.deepcopy(GOOD_HT), "from_name": "plain", "to_name": "page", "type": "labels"}
    on_url["value"]["labels"] = on_url["value"].pop("hypertextlabels")
    assert _codes(on_url) == []  # the document is behind a URL: only the shape is checked
    assert ("bad_span", "error") in _codes(_with(on_url, startOffset=None))


@pytest.mark.parametrize(
    ("change", "code", "severity"),
    [
        ({"start": "5", "end": "5"}, "paragraph_out_of_range", "error"),
        ({"endOffset": 40}, "offset_outside_node", "error"),
        ({"startOffset": 14, "endOffset": 26}, "span_mismatch", "error"),  # code points
        ({"start": "x"}, "bad_span", "error"),
        ({"end": "0", "endOffset": 2}, "bad_span", "error"),
        ({"start": 0, "end": 0}, "paragraph_index_type", "warning"),
    ],
)
def test_paragraph_errors(change: dict[str, Any], code: str, severity: str) -> None:
    codes = _codes(_with(GOOD_P, **change))
    assert (code, severity) in codes, codes


def test_filter_valid_drops_a_broken_hypertext_region() -> None:
    schema = ConfigSchema.from_config(CONFIG)
    broken = _with(GOOD_HT, start="/p[1]/text()[9]")
    broken["id"] = "r9"
    kept, problems = filter_valid(schema, [GOOD_HT, broken, GOOD_P], DATA)
    assert [i["id"] for i in kept] == ["r1", "r2"]
    assert [p.code for p in problems] == ["xpath_not_found"]

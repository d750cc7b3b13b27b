"""Span checks: Labels on Text, HyperText and Paragraphs (offsets inside the text, matching its text)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serving.results import hypertext
from serving.results.schema import ObjectInfo
from serving.results.utf16 import utf16_len
from serving.results.validation.problems import (
    CheckerBase,
    Problem,
)


class SpanChecks(CheckerBase):
    """Checks of labelled spans."""

    def span(self, item: Mapping[str, Any], obj: ObjectInfo, value: Mapping[str, Any]) -> list[Problem]:
        start, end = value.get("start"), value.get("end")
        if (
            not (isinstance(start, int) and isinstance(end, int))
            or isinstance(start, bool)
            or isinstance(end, bool)
        ):
            return [
                self.problem(
                    item,
                    "bad_span",
                    f"a text span needs integer value.start and value.end (character offsets), got {start!r}, {end!r}",
                )
            ]
        if not 0 <= start < end:
            return [
                self.problem(
                    item, "bad_span", f"span [{start}, {end}) is empty or negative; need 0 <= start < end"
                )
            ]
        text = None
        if self.task_data is not None and obj.value_key and not obj.is_url:
            raw = self.task_data.get(obj.value_key)
            if isinstance(raw, str) and not raw.startswith(
                ("http://", "https://", "/data/", "s3://", "gs://")
            ):
                text = raw
        if text is None:
            return []
        if end > len(text) and end > utf16_len(text):
            return [
                self.problem(
                    item,
                    "bad_span",
                    f"span end {end} is past the end of the task text ({len(text)} characters)",
                )
            ]
        span_text = value.get("text")
        if span_text is None:
            return []
        if span_text != text[start:end] and span_text != _utf16_slice(text, start, end):
            return [
                self.problem(
                    item,
                    "span_mismatch",
                    f"value.text {str(span_text)[:60]!r} is not text[{start}:{end}] = {text[start:end][:60]!r}; "
                    "fix start/end, or set value.text to the text at those offsets",
                )
            ]
        return []

    def hypertext_span(
        self, item: Mapping[str, Any], obj: ObjectInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        """Check an XPath range: both paths resolve in the document as shown, offsets inside their nodes, text."""
        shape = self._hypertext_shape(item, value)
        if shape:
            return shape
        html = self._object_text(obj)
        if html is None:
            return []
        inline, encoding, _ = hypertext.object_options(obj.attrs)
        try:
            doc = hypertext.parse_html(hypertext.decode_value(html, encoding), inline)
        except ValueError as exc:
            return [
                self.problem(
                    item, "bad_data", f"the task's HyperText value does not decode as {encoding}: {exc}"
                )
            ]
        points, out = self._hypertext_points(item, doc, value)
        if out:
            return out
        g0, g1 = points
        if g0 >= g1:
            return [
                self.problem(
                    item, "bad_span", f"the range is empty or reversed (global offsets {g0} to {g1})"
                )
            ]
        offsets = value.get("globalOffsets")
        if offsets is not None and (offsets["start"], offsets["end"]) != (g0, g1):
            out.append(
                self.problem(
                    item,
                    "global_offsets_mismatch",
                    f"globalOffsets {offsets['start']}..{offsets['end']} differ from the XPath range's {g0}..{g1} "
                    "(code points over every text node, <br> counting 1); Label Studio uses the XPaths",
                    "warning",
                )
            )
        text = value.get("text")
        if isinstance(text, str):
            shown = doc.text_between(g0, g1)
            if not hypertext.same_text(text, shown):
                out.append(
                    self.problem(
                        item,
                        "span_mismatch",
                        f"value.text {text[:60]!r} is not the text of the range, {shown[:60]!r}; the offsets point "
                        "elsewhere (HTML changed, e.g. minified, or offsets counted in code points, not UTF-16)",
                    )
                )
        return out

    def _hypertext_shape(self, item: Mapping[str, Any], value: Mapping[str, Any]) -> list[Problem]:
        """Check an XPath range's fields have the types Label Studio stores (before the document is read)."""
        start, end = value.get("start"), value.get("end")
        soff, eoff = value.get("startOffset"), value.get("endOffset")
        if not (isinstance(start, str) and isinstance(end, str)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (soff, eoff)
        ):
            return [
                self.problem(
                    item,
                    "bad_span",
                    'a HyperText span needs value.start/value.end as XPaths of text nodes ("/p[1]/text()[1]") '
                    f"and integer value.startOffset/value.endOffset, got {start!r}, {soff!r}, {end!r}, {eoff!r}"[
                        :400
                    ],
                )
            ]
        offsets = value.get("globalOffsets")
        if offsets is not None and not (
            isinstance(offsets, Mapping)
            and all(
                isinstance(offsets.get(k), int) and not isinstance(offsets.get(k), bool)
                for k in ("start", "end")
            )
        ):
            return [
                self.problem(
                    item,
                    "bad_span",
                    f"value.globalOffsets must be {{'start': int, 'end': int}}, got {offsets!r}"[:300],
                )
            ]
        return []

    def _hypertext_points(
        self, item: Mapping[str, Any], doc: hypertext.HtmlDocument, value: Mapping[str, Any]
    ) -> tuple[list[int], list[Problem]]:
        """Return the range's two global offsets in the document, or the problems of the paths that do not resolve."""
        out: list[Problem] = []
        points = []
        for path, offset in ((value["start"], value["startOffset"]), (value["end"], value["endOffset"])):
            if doc.node_index(path) is None:
                out.append(
                    self.problem(
                        item,
                        "xpath_not_found",
                        f"XPath {path!r} does not resolve to a text node of the document as Label Studio shows it "
                        "(after dropping scripts, iframes and comments; inside <body>, or the <div> with "
                        'inline="true"); compute XPaths on the task\'s HTML exactly as stored',
                    )
                )
                continue
            try:
                points.append(doc.global_offset(path, offset))
            except ValueError as exc:
                out.append(
                    self.problem(item, "offset_outside_node", f"{exc}; offsets count UTF-16 code units")
                )
        return points, out

    def paragraph_span(
        self, item: Mapping[str, Any], obj: ObjectInfo, value: Mapping[str, Any]
    ) -> list[Problem]:
        """Check a Paragraphs range: paragraph indices, UTF-16 offsets inside them, and the text."""
        parsed = self._paragraph_shape(item, value)
        if isinstance(parsed, list):
            return parsed
        (i0, soff), (i1, eoff), out = parsed
        if (i1, eoff) <= (i0, soff):
            return [*out, self.problem(item, "bad_span", "the range is empty or reversed")]
        if self.task_data is None or not obj.value_key or obj.is_url:
            return out
        data = self.task_data.get(obj.value_key)
        if not isinstance(data, list):
            return out
        try:
            texts = hypertext.paragraph_texts(data, obj.attrs.get("textkey") or "text")
        except ValueError as exc:
            return [*out, self.problem(item, "bad_data", str(exc))]
        for i in (i0, i1):
            if i >= len(texts):
                return [
                    *out,
                    self.problem(
                        item,
                        "paragraph_out_of_range",
                        f"paragraph {i} does not exist: the task has {len(texts)} paragraphs (indices from 0)",
                    ),
                ]
        out.extend(self._paragraph_offsets(item, texts, ((i0, soff), (i1, eoff))))
        if out and any(p.severity == "error" for p in out):
            return out
        text = value.get("text")
        if isinstance(text, str):
            shown = _paragraph_text(texts, i0, soff, i1, eoff)
            if not hypertext.same_text(text, shown):
                out.append(
                    self.problem(
                        item,
                        "span_mismatch",
                        f"value.text {text[:60]!r} is not the text of the range, {shown[:60]!r}; offsets count "
                        "UTF-16 code units inside the paragraph's text",
                    )
                )
        return out

    def _paragraph_offsets(
        self, item: Mapping[str, Any], texts: list[str], ends: tuple[tuple[int, int], ...]
    ) -> list[Problem]:
        """Check that each end's UTF-16 offset lies inside its paragraph."""
        out = []
        for i, offset in ends:
            size = utf16_len(texts[i])
            if not 0 <= offset <= size:
                out.append(
                    self.problem(
                        item,
                        "offset_outside_node",
                        f"offset {offset} is outside paragraph {i} ({size} UTF-16 code units: {texts[i][:40]!r})",
                    )
                )
        return out

    def _paragraph_shape(
        self, item: Mapping[str, Any], value: Mapping[str, Any]
    ) -> list[Problem] | tuple[tuple[int, int], tuple[int, int], list[Problem]]:
        """Return a Paragraphs range's (index, offset) ends and its warnings, or the problems of a malformed one."""
        raw_index = {k: value.get(k) for k in ("start", "end")}
        soff, eoff = value.get("startOffset"), value.get("endOffset")
        index: dict[str, int] = {}
        for key, raw in raw_index.items():
            if isinstance(raw, str) and raw.strip().isdigit():
                index[key] = int(raw)
            elif isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
                index[key] = raw
        if (
            len(index) < 2
            or not (isinstance(soff, int) and isinstance(eoff, int))
            or isinstance(soff, bool)
            or isinstance(eoff, bool)
        ):
            return [
                self.problem(
                    item,
                    "bad_span",
                    'a Paragraphs span needs value.start/value.end as paragraph indices ("2") and integer '
                    f"value.startOffset/value.endOffset, got {raw_index['start']!r}, {soff!r}, "
                    f"{raw_index['end']!r}, {eoff!r}"[:400],
                )
            ]
        out: list[Problem] = []
        if not all(isinstance(v, str) for v in raw_index.values()):
            out.append(
                self.problem(
                    item,
                    "paragraph_index_type",
                    'Label Studio\'s editor stores paragraph indices as strings ("2"); use strings',
                    "warning",
                )
            )
        return (index["start"], soff), (index["end"], eoff), out

    def _object_text(self, obj: ObjectInfo) -> str | None:
        """Return the object's inline task value (None when unknown here: a URL, or no task data)."""
        if self.task_data is None or not obj.value_key or obj.is_url:
            return None
        raw = self.task_data.get(obj.value_key)
        return raw if isinstance(raw, str) else None


def _paragraph_text(texts: list[str], i0: int, soff: int, i1: int, eoff: int) -> str:
    """Return the text of a Paragraphs range: from offset soff of paragraph i0 to offset eoff of paragraph i1."""
    if i0 == i1:
        return _utf16_slice(texts[i0], soff, eoff)
    return "".join(
        [_utf16_slice(texts[i0], soff, None), *texts[i0 + 1 : i1], _utf16_slice(texts[i1], 0, eoff)]
    )


def _utf16_slice(text: str, start: int, end: int | None) -> str:
    """Return text[start:end] in UTF-16 code units (the offsets Label Studio's browser editor uses).

    surrogatepass: a lone surrogate of the task's JSON is one unit, as in JavaScript, not an error.
    """
    stop = None if end is None else 2 * end
    units = text.encode("utf-16-le", "surrogatepass")[2 * start : stop]
    return units.decode("utf-16-le", "surrogatepass")

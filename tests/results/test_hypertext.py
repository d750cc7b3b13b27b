"""serving/results/hypertext.py: the document Label Studio's page shows, XPaths, UTF-16 and global offsets, round trips."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.results.hypertext import (
    HtmlDocument,
    decode_value,
    object_options,
    paragraph_texts,
    parse_html,
    same_text,
)
from serving.results.utf16 import code_point_index, utf16_len, utf16_offset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hypertext"


def _range(doc: HtmlDocument, words: str, nth: int = 0) -> tuple[str, int, str, int, int, int, str]:
    start = -1
    for _ in range(nth + 1):
        start = doc.text.index(words, start + 1)
    rng = doc.span(start, start + len(words))
    assert rng is not None
    return (rng.start, rng.start_offset, rng.end, rng.end_offset, rng.global_start, rng.global_end, rng.text)


def _round_trip(doc: HtmlDocument, words: str) -> None:
    """The range of `words` resolves back to the same global offsets and to the same text."""
    start = doc.text.index(words)
    rng = doc.span(start, start + len(words))
    assert rng is not None
    assert doc.global_offset(rng.start, rng.start_offset) == rng.global_start
    assert doc.global_offset(rng.end, rng.end_offset) == rng.global_end
    assert same_text(doc.text_between(rng.global_start, rng.global_end), words)


def test_nested_html_xpaths_and_offsets() -> None:
    doc = parse_html(
        "<div><p>First <b>bold</b> para.</p><div><p>Second <i>in <b>Paris</b></i> today.</p></div></div>"
    )
    assert [(n.path, n.data) for n in doc.nodes] == [
        ("/div[1]/p[1]/text()[1]", "First "),
        ("/div[1]/p[1]/b[1]/text()[1]", "bold"),
        ("/div[1]/p[1]/text()[2]", " para."),
        ("/div[1]/div[1]/p[1]/text()[1]", "Second "),
        ("/div[1]/div[1]/p[1]/i[1]/text()[1]", "in "),
        ("/div[1]/div[1]/p[1]/i[1]/b[1]/text()[1]", "Paris"),
        ("/div[1]/div[1]/p[1]/text()[2]", " today."),
    ]
    assert doc.text == "First bold para.\n\nSecond in Paris today."
    assert _range(doc, "Paris") == (
        "/div[1]/div[1]/p[1]/i[1]/b[1]/text()[1]",
        0,
        "/div[1]/div[1]/p[1]/i[1]/b[1]/text()[1]",
        5,
        26,
        31,
        "Paris",
    )
    for words in ("First bold para.", "in Paris", "Paris today", "Second in Paris today."):
        _round_trip(doc, words)


def test_entities_spanning_b_and_a_boundaries() -> None:
    doc = parse_html(
        '<p>Barack <b>Obama</b> met <a href="#">Angela</a> Merkel in <b>New</b> <a>York</a>.</p>'
    )
    assert _range(doc, "Barack Obama") == (
        "/p[1]/text()[1]",
        0,
        "/p[1]/b[1]/text()[1]",
        5,
        0,
        12,
        "Barack Obama",
    )
    assert _range(doc, "Angela Merkel") == (
        "/p[1]/a[1]/text()[1]",
        0,
        "/p[1]/text()[3]",
        7,
        17,
        30,
        "Angela Merkel",
    )
    assert _range(doc, "New York") == (
        "/p[1]/b[2]/text()[1]",
        0,
        "/p[1]/a[2]/text()[1]",
        4,
        34,
        42,
        "New York",
    )
    for words in ("Barack Obama", "Angela Merkel", "New York"):
        _round_trip(doc, words)


def test_html_entities_count_as_the_characters_they_decode_to() -> None:
    doc = parse_html("<p>AT&amp;T &lt;3 San&nbsp;Jos&eacute; &#x1F600; Tokyo</p>")
    assert doc.nodes[0].data == "AT&T <3 San\xa0José 😀 Tokyo"
    assert _range(doc, "San\xa0José") == ("/p[1]/text()[1]", 8, "/p[1]/text()[1]", 16, 8, 16, "San\xa0José")
    # the emoji is one code point (global offsets) and two UTF-16 units (node offsets)
    assert _range(doc, "Tokyo") == ("/p[1]/text()[1]", 20, "/p[1]/text()[1]", 25, 19, 24, "Tokyo")


def test_non_ascii_and_emoji_offsets() -> None:
    text = "Zoë 👩‍👩‍👧 met Владимир in Zürich 🇨🇭 and São Paulo."
    doc = parse_html(f"<p><b>{text[:3]}</b>{text[3:]}</p>")
    node = doc.nodes[1]
    for words in ("Владимир", "Zürich", "São Paulo"):
        rng = doc.span(doc.text.index(words), doc.text.index(words) + len(words))
        assert rng is not None and rng.text == words
        cp = node.data.index(words)
        # node offsets are UTF-16 units (JavaScript), global offsets code points
        assert rng.start_offset == len(node.data[:cp].encode("utf-16-le")) // 2
        assert rng.global_start == node.start + cp
        assert (
            node.data.encode("utf-16-le")[2 * rng.start_offset : 2 * rng.end_offset].decode("utf-16-le")
            == words
        )
        _round_trip(doc, words)
    assert utf16_offset("a😀b", 2) == 3 and code_point_index("a😀b", 3) == 2
    assert code_point_index("a😀b", 2) is None  # inside the surrogate pair
    assert code_point_index("a😀b", 5) is None


def test_sanitizing_drops_scripts_iframes_and_comments_and_merges_text() -> None:
    doc = parse_html(
        "<p>Tim<!-- x --> Cook <script>var a = '<b>';</script>of <b>Apple</b>"
        '<iframe src="http://ads.example/x"></iframe> and '
        '<iframe src="https://www.youtube.com/embed/x"></iframe> Google.</p>'
    )
    assert [(n.path, n.data) for n in doc.nodes] == [
        ("/p[1]/text()[1]", "Tim Cook of "),
        ("/p[1]/b[1]/text()[1]", "Apple"),
        ("/p[1]/text()[2]", " and "),
        ("/p[1]/text()[3]", " Google."),
    ]
    assert doc.node_index("/p[1]/iframe[1]") is not None  # the YouTube embed stays an element
    assert _range(doc, "Google") == ("/p[1]/text()[3]", 1, "/p[1]/text()[3]", 7, 23, 29, "Google")


def test_document_vs_inline_fragment() -> None:
    html = "<html><head><title>T</title></head><body><p>Paris</p></body></html>"
    assert [(n.path, n.start) for n in parse_html(html).nodes] == [("/p[1]/text()[1]", 0)]
    inline = parse_html(html, inline=True)  # the head's elements become nodes of the div
    assert [(n.path, n.start, n.visible) for n in inline.nodes] == [
        ("/title[1]/text()[1]", 0, False),
        ("/p[1]/text()[1]", 1, True),
    ]
    assert _range(inline, "Paris")[4:6] == (1, 6)


def test_visible_text_collapses_white_space_and_breaks_blocks() -> None:
    html = (
        "<html><head><style>p {}</style></head><body>\n  <h1>  Title\n  here </h1>\n"
        "<p>one\n\t two<br>three</p><div hidden>secret</div><span style='display: none'>gone</span>"
        "<pre>  keep   this\nline</pre><ul><li>a</li><li>b</li></ul>\r\n</body></html>"
    )
    doc = parse_html(html)
    assert doc.text == "Title here\n\none two\nthree\n\n  keep   this\nline\n\na\n\nb"
    assert doc.span(doc.text.index("two"), doc.text.index("three") + 5) is None  # across a <br>
    assert doc.span(doc.text.index("a\n\nb"), len(doc.text)) is None  # across two list items
    assert "secret" not in doc.text and any(n.data == "secret" and not n.visible for n in doc.nodes)
    # hidden text nodes still count in global offsets (Label Studio counts every text node)
    assert doc.nodes[-1].start == sum(len(n.data) for n in doc.nodes[:-1]) + 1  # + the <br>
    assert doc.text.count("\r") == 0  # CRLF is one "\n" in the DOM, as in the browser
    _round_trip(doc, "keep   this")


def test_minified_and_original_documents_give_different_ranges_for_the_same_words() -> None:
    original = parse_html((FIXTURES / "article.html").read_text(encoding="utf-8"))
    minified = parse_html((FIXTURES / "article.min.html").read_text(encoding="utf-8"))
    assert original.text == minified.text  # what a reader sees is the same...
    for words in ("Angela Merkel", "United Nations", "Tim Cook"):
        a, b = _range(original, words), _range(minified, words)
        assert a[4:6] != b[4:6]  # ...global offsets always differ (white space between tags is gone)
        _round_trip(original, words)
        _round_trip(minified, words)
    # a list item's own text survives minifying: same XPath and node offsets
    assert _range(original, "Tim Cook")[:4] == _range(minified, "Tim Cook")[:4]
    # but a range computed on the original lands elsewhere, or nowhere, on the minified page
    for words in ("Angela Merkel", "United Nations"):
        path, offset, end_path, end_offset, *_ = _range(original, words)
        try:
            start, end = minified.global_offset(path, offset), minified.global_offset(end_path, end_offset)
        except ValueError:
            continue
        assert not same_text(minified.text_between(start, end), words)


def test_empty_and_script_only_pages_have_no_text() -> None:
    for html in (
        "",
        "   ",
        "<script>alert('Barack Obama')</script>",
        "<html><head><title>x</title></head></html>",
    ):
        doc = parse_html(html)
        assert doc.text == "" and doc.span(0, 0) is None
    assert parse_html("<script>x</script>", inline=True).nodes == ()


def test_xpath_and_offset_errors() -> None:
    doc = parse_html("<p>Hello <b>world</b></p>")
    with pytest.raises(ValueError, match="does not resolve"):
        doc.global_offset("/p[2]/text()[1]", 0)
    with pytest.raises(ValueError, match="outside its node"):
        doc.global_offset("/p[1]/b[1]/text()[1]", 6)
    # an element path resolves to the first text node at its start, as the editor does
    assert doc.global_offset("/p[1]/b[1]", 2) == 8


def test_decode_and_options() -> None:
    html = "<p>Zoë 😀</p>"
    assert decode_value(base64.b64encode(html.encode()).decode(), "base64unicode") == html
    assert decode_value(base64.b64encode(b"<p>A</p>").decode(), "base64") == "<p>A</p>"
    assert decode_value(html, "none") == html
    assert object_options({"inline": "true", "valueType": "URL"}) == (True, "none", True)
    assert object_options({}) == (False, "none", False)
    assert paragraph_texts([{"text": "a"}, {"line": "b"}, {"text": 3}]) == ["a", "", "3"]
    with pytest.raises(ValueError):
        paragraph_texts("not a list")


_WORD = st.text(alphabet="abcXYZéß中😀", min_size=1, max_size=6)
_INLINE = st.sampled_from(["b", "i", "a", "span", "em"])
_BLOCK = st.sampled_from(["p", "div", "li", "h2"])


@st.composite
def _html(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        block = draw(_BLOCK)
        inner = []
        for _ in range(draw(st.integers(1, 5))):
            words = " ".join(draw(st.lists(_WORD, min_size=1, max_size=3)))
            pad = draw(st.sampled_from(["", " ", "\n  ", "<!-- c -->"]))
            if draw(st.booleans()):
                tag = draw(_INLINE)
                inner.append(f"{pad}<{tag}>{words}</{tag}>")
            else:
                inner.append(f"{pad}{words}")
        parts.append(f"<{block}>{' '.join(inner)}</{block}>\n")
    return "".join(parts)


@settings(max_examples=150, deadline=None)
@given(_html(), st.data())
def test_any_span_of_visible_text_round_trips(html: str, data: st.DataObject) -> None:
    doc = parse_html(html)
    assert doc.text
    start = data.draw(st.integers(0, len(doc.text) - 1))
    end = data.draw(st.integers(start + 1, len(doc.text)))
    rng = doc.span(start, end)
    if rng is None:
        # only white space, or a block break inside: nothing else is refused
        assert not doc.text[start:end].strip() or "\n" in doc.text[start:end].strip()
        return
    assert rng.text == doc.text[start:end].strip()
    assert doc.global_offset(rng.start, rng.start_offset) == rng.global_start
    assert doc.global_offset(rng.end, rng.end_offset) == rng.global_end
    assert same_text(doc.text_between(rng.global_start, rng.global_end), rng.text)


def _js_units(text: str) -> bytes:
    """Return text as JavaScript holds it: UTF-16 code units, a lone surrogate being one unit."""
    return text.encode("utf-16-le", "surrogatepass")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab é中😀🇨\ud800\udc00"), max_size=12), st.data())
def test_utf16_conversions_count_as_javascript_does(text: str, data: st.DataObject) -> None:
    """Astral characters are two units, everything else one, lone surrogates (JSON "\\udc00") included."""
    units = _js_units(text)
    assert utf16_len(text) == len(units) // 2
    index = data.draw(st.integers(0, len(text)))
    assert utf16_offset(text, index) == len(_js_units(text[:index])) // 2
    offsets = {len(_js_units(text[:i])) // 2: i for i in range(len(text) + 1)}
    for offset in range(-1, len(units) // 2 + 2):
        assert code_point_index(text, offset) == offsets.get(offset)


def test_paragraphs_with_a_lone_surrogate_validate_instead_of_raising() -> None:
    """A lone surrogate in a task's JSON is one UTF-16 unit in the editor; the validator counts it so."""
    from serving.results.schema import ConfigSchema
    from serving.results.validation.checks import check_items

    config = (
        '<View><Paragraphs name="d" value="$d"/><ParagraphLabels name="pl" toName="d">'
        '<Label value="Person"/></ParagraphLabels></View>'
    )
    line = "\udc00 I met Barack Obama 😀 in Paris."
    region = {
        "id": "r",
        "from_name": "pl",
        "to_name": "d",
        "type": "paragraphlabels",
        "value": {"start": "0", "end": "0", "text": "Barack Obama", "paragraphlabels": ["Person"]},
    }
    data = {"d": [{"author": "A", "text": line}]}
    schema = ConfigSchema.from_config(config)
    for words in ("Barack Obama", "Paris"):
        cp = line.index(words)
        start = len(_js_units(line[:cp])) // 2  # 8 for Barack (no pair before), 27 for Paris (after 😀)
        value = {**region["value"], "startOffset": start, "endOffset": start + len(words), "text": words}
        assert check_items(schema, [dict(region, value=value)], data) == []
        wrong = {**value, "startOffset": start - 1, "endOffset": start - 1 + len(words)}
        assert [p.code for p in check_items(schema, [dict(region, value=wrong)], data)] == ["span_mismatch"]


def test_deeply_nested_pages_are_walked_without_recursion() -> None:
    """500 nested elements (Chromium keeps up to 512) give exact ranges instead of a RecursionError."""
    depth = 500
    html = "<div>" * depth + "Barack <b>Obama</b> met" + "</div>" * depth + "<p>Angela Merkel</p>"
    for inline in (False, True):
        doc = parse_html(html, inline=inline)
        deep = "/div[1]" * depth
        assert [(n.path, n.data) for n in doc.nodes] == [
            (f"{deep}/text()[1]", "Barack "),
            (f"{deep}/b[1]/text()[1]", "Obama"),
            (f"{deep}/text()[2]", " met"),
            ("/p[1]/text()[1]", "Angela Merkel"),
        ]
        assert doc.text == "Barack Obama met\n\nAngela Merkel"
        assert _range(doc, "Barack Obama")[:4] == (f"{deep}/text()[1]", 0, f"{deep}/b[1]/text()[1]", 5)
        _round_trip(doc, "Barack Obama")
        _round_trip(doc, "Angela Merkel")

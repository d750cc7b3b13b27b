"""Label Studio's HyperText geometry: the HTML as the labeling page shows it, its XPaths and offsets.

What Label Studio 1.23.2's editor does with a `<HyperText>` value (RichText tag, DomManager), mirrored here:

1. `encoding="base64"` / `"base64unicode"` decodes the value (atob: bytes as Latin-1 / as UTF-8).
2. sanitize-html drops `<script>` and `<iframe>` (except https YouTube embeds) with their content, and every
   comment, then re-serialises: text nodes on either side of a dropped node become one text node.
3. The browser parses the result: as a whole document inside an iframe (the default), regions addressed
   from `<body>`; with `inline="true"` as a fragment inside a `<div>`, regions addressed from that div.
4. Every node under that root is walked in document order: each text node advances the global offset by
   its length in code points, a `<br>` by one. A region is stored as `start`/`end` = XPaths of text nodes
   (`/div[1]/p[2]/text()[1]`: 1-based index among same-named siblings), `startOffset`/`endOffset` = offsets
   inside those nodes in UTF-16 code units (DOM Range offsets), and `globalOffsets` = code points.

Label Studio 1.23.2 stores uploaded `.html` files and inline JSON values verbatim (no minifier; older
versions ran htmlmin on uploads), so offsets computed on the task's value land where annotators see them.
What is not mirrored: DOM differences between sanitize-html's own parser and the browser's on malformed
markup, `<noscript>` text re-serialised by sanitize-html (only `globalOffsets` after it would shift), and
Chromium attaching elements nested deeper than 512 levels higher up (such pages are walked, not mirrored).

The NER input is the visible text: hidden subtrees (`head`, `style`, `title`, `template`, `[hidden]`,
`display:none`...) left out, whitespace collapsed as CSS does outside `<pre>`, block boundaries and `<br>`
turned into line breaks that no entity may cross. Each visible character maps back to one character of
one text node, so any span of it turns into an exact Label Studio range.
"""

from __future__ import annotations

import base64
import bisect
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from serving.results.utf16 import LONE_SURROGATE, Utf16Map

# Elements sanitize-html removes with their content (iframes only when not an https YouTube embed).
_DROPPED = frozenset({"script", "iframe"})
_IFRAME_HOSTS = frozenset(
    {"www.youtube.com", "youtube.com", "www.youtube-nocookie.com", "youtube-nocookie.com", "youtu.be"}
)
# Subtrees whose text a reader never sees: not NER input (their text nodes still count in offsets).
_HIDDEN = frozenset(
    {
        "head",
        "title",
        "style",
        "script",
        "template",
        "noscript",
        "noembed",
        "noframes",
        "textarea",
        "select",
        "option",
        "optgroup",
        "datalist",
        "iframe",
        "object",
        "embed",
        "canvas",
        "audio",
        "video",
        "meta",
        "link",
        "desc",
        "metadata",
    }
)
# Elements that start a new block of text: an entity never crosses their boundaries.
_BLOCKS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "body",
        "caption",
        "center",
        "dd",
        "details",
        "dialog",
        "dir",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hgroup",
        "hr",
        "html",
        "legend",
        "li",
        "listing",
        "main",
        "menu",
        "nav",
        "ol",
        "p",
        "plaintext",
        "pre",
        "section",
        "summary",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "ul",
        "xmp",
    }
)
_PREFORMATTED = frozenset({"pre", "listing", "xmp", "plaintext", "textarea"})
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)
_PRE_STYLE = re.compile(r"white-space\s*:\s*(pre|break-spaces)", re.IGNORECASE)
# CSS collapsible white space (not U+00A0: a no-break space is kept as it is).
_WS = " \t\n\r\f"
_WS_TO_SPACE = str.maketrans({c: " " for c in _WS})
# In a text node: the runs whose collapsing moves characters (leading, trailing, or 2+ long).
_COLLAPSE = re.compile(r"^[ \t\n\r\f]+|[ \t\n\r\f]{2,}|[ \t\n\r\f]+$")
_ANY_WS = re.compile(r"\s+")
BLOCK_BREAK = "\n\n"
LINE_BREAK = "\n"


def decode_value(value: str, encoding: str = "") -> str:
    """Decode a HyperText value like the editor does for `encoding="base64"` / `"base64unicode"`."""
    mode = (encoding or "none").strip().lower()
    if mode == "base64":
        return base64.b64decode(value).decode("latin-1")
    if mode == "base64unicode":
        return base64.b64decode(value).decode("utf-8")
    return value


def object_options(attrs: Mapping[str, Any]) -> tuple[bool, str, bool]:
    """Return (inline, encoding, value is a URL) from a HyperText tag's attributes (any key case)."""
    low = {str(k).lower(): str(v).strip().lower() for k, v in attrs.items()}
    return (
        low.get("inline", "false") in {"true", "1", "yes"},
        low.get("encoding", "none"),
        low.get("valuetype", "text") == "url",
    )


@dataclass(frozen=True, slots=True)
class TextNode:
    """One text node of the document as the labeling page holds it."""

    path: str  # XPath from the root, e.g. "/div[1]/p[2]/text()[1]"
    data: str  # the node's text (after sanitizing)
    start: int  # global offset (code points, <br> counts 1) of its first character
    visible: bool

    @property
    def end(self) -> int:
        """Return the global offset just past the node's last character."""
        return self.start + len(self.data)


@dataclass(frozen=True, slots=True)
class HtmlRange:
    """A Label Studio HyperText region: XPaths + UTF-16 offsets, global code point offsets, shown text."""

    start: str
    start_offset: int
    end: str
    end_offset: int
    global_start: int
    global_end: int
    text: str

    def value(self) -> dict[str, Any]:
        """Return the result `value` fields Label Studio stores for this range (labels not included)."""
        return {
            "start": self.start,
            "startOffset": self.start_offset,
            "end": self.end,
            "endOffset": self.end_offset,
            "globalOffsets": {"start": self.global_start, "end": self.global_end},
            "text": self.text,
        }


class HtmlDocument:
    """The text nodes of an HTML document as Label Studio's labeling page addresses them, and its visible text."""

    def __init__(
        self,
        nodes: list[TextNode],
        element_starts: dict[str, int],
        length: int,
        text: str,
        segments: tuple[list[int], list[int], list[int], list[int]],
    ) -> None:
        """Hold the parsed model; build it with parse_html()."""
        self.nodes = tuple(nodes)
        self.length = length  # the global offset past the last text node / <br>
        self.text = text  # the visible text (NER input)
        self._by_path = {node.path: i for i, node in enumerate(nodes)}
        self._element_starts = element_starts
        self._starts = [node.start for node in nodes]
        # visible text offset -> (node, code point in node), as runs: where each run starts in the
        # visible text, its node, its first code point in the node, its length
        self._seg_vis, self._seg_node, self._seg_cp, self._seg_len = segments
        self._utf16: dict[int, Utf16Map] = {}  # per non-ASCII node, built on first use

    def _map(self, index: int) -> Utf16Map | None:
        """Return the UTF-16 map of a node (None for ASCII text: offsets are the same)."""
        data = self.nodes[index].data
        if data.isascii():
            return None
        found = self._utf16.get(index)
        if found is None:
            found = self._utf16[index] = Utf16Map(data)
        return found

    def _utf16_offset(self, index: int, cp: int) -> int:
        found = self._map(index)
        return cp if found is None else found.offset(cp)

    # ---- visible text -> Label Studio range ----
    def _locate(self, pos: int) -> int:
        """Return the segment holding visible character pos, or -1 for a synthetic break."""
        i = bisect.bisect_right(self._seg_vis, pos) - 1
        if i >= 0 and pos < self._seg_vis[i] + self._seg_len[i]:
            return i
        return -1

    def span(self, start: int, end: int) -> HtmlRange | None:
        """Return the range of visible text [start, end), trimmed of white space; None across a block break."""
        text = self.text
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end <= start:
            return None
        first, last = self._locate(start), self._locate(end - 1)
        if first < 0 or last < 0:
            return None
        # runs of one span must follow each other in the visible text: a gap is a block break
        for j in range(first, last):
            if self._seg_vis[j] + self._seg_len[j] != self._seg_vis[j + 1]:
                return None
        n0 = self._seg_node[first]
        k0 = self._seg_cp[first] + start - self._seg_vis[first]
        n1 = self._seg_node[last]
        k1 = self._seg_cp[last] + (end - 1) - self._seg_vis[last] + 1
        a, b = self.nodes[n0], self.nodes[n1]
        return HtmlRange(
            start=a.path,
            start_offset=self._utf16_offset(n0, k0),
            end=b.path,
            end_offset=self._utf16_offset(n1, k1),
            global_start=a.start + k0,
            global_end=b.start + k1,
            text=text[start:end],
        )

    # ---- Label Studio range -> document (validation) ----
    def node_index(self, path: str) -> int | None:
        """Return the text node an XPath names as Label Studio resolves it, or None when it does not resolve.

        A text node path names that node; an element path (which Label Studio also accepts) names the
        first text node at or after the element's start.
        """
        found = self._by_path.get(path)
        if found is not None:
            return found
        pos = self._element_starts.get(path)
        if pos is None:
            return None
        for i in range(bisect.bisect_left(self._starts, pos), len(self.nodes)):
            node = self.nodes[i]
            if node.start <= pos < node.end:
                return i
            if node.start > pos:
                break
        return None

    def global_offset(self, path: str, offset: Any) -> int:
        """Return the global offset of (XPath, UTF-16 offset); raise ValueError saying what is wrong."""
        index = self.node_index(path)
        if index is None:
            raise ValueError(
                f"XPath {path!r} does not resolve to a text node of the document as Label Studio shows it"
            )
        node = self.nodes[index]
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise ValueError(f"offset {offset!r} is not an integer")
        found = self._map(index)
        size = len(node.data) if found is None else found.units
        if not 0 <= offset <= size:
            raise ValueError(
                f"offset {offset} is outside its node {path!r} ({size} UTF-16 code units: {node.data[:40]!r})"
            )
        cp = offset if found is None else found.index(offset)
        if cp is None:
            raise ValueError(f"offset {offset} splits a surrogate pair in node {path!r}")
        return node.start + cp

    def text_between(self, start: int, end: int) -> str:
        """Return the visible nodes' text between two global offsets (raw, white space as in the source)."""
        out = []
        for i in range(max(0, bisect.bisect_right(self._starts, start) - 1), len(self.nodes)):
            node = self.nodes[i]
            if node.start >= end:
                break
            if node.end <= start or not node.visible:
                continue
            out.append(node.data[max(0, start - node.start) : end - node.start])
        return "".join(out)


def same_text(a: str, b: str) -> bool:
    """Return True when two texts are equal once each run of white space is one space (as a page shows them).

    Stricter than the editor's own check (which removes all white space), so that a range one
    character off onto a space is still caught.
    """
    return _ANY_WS.sub(" ", a) == _ANY_WS.sub(" ", b)


@dataclass(slots=True)
class _Level:
    """One parent being walked: its next child, XPath, inherited hiding and white space, its counters."""

    child: Any
    prefix: str
    hidden: bool
    pre: bool
    block: bool  # a visible block: a block break is owed when its children end
    counters: dict[str, int] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)  # adjacent text pieces (merged once a node ends)


class _Builder:
    """Walk a parsed tree once: text nodes, XPaths, global offsets and the visible text with its mapping."""

    def __init__(self) -> None:
        self.nodes: list[TextNode] = []
        self.element_starts: dict[str, int] = {}
        self.pos = 0
        self.pieces: list[str] = []
        self.vis = 0
        self.seg_vis: list[int] = []
        self.seg_node: list[int] = []
        self.seg_cp: list[int] = []
        self.seg_len: list[int] = []
        self.pending_break = ""  # a block or line break owed before the next visible text
        self.pending_space: tuple[int, int] | None = None  # (node, code point) of an owed collapsed space
        self.at_line_start = True  # nothing visible yet on this line: leading white space is dropped

    # ---- visible text ----
    def _emit(self, node: int, cp: int, chunk: str) -> None:
        if self.pending_break:
            if self.vis:
                self.pieces.append(self.pending_break)
                self.vis += len(self.pending_break)
            self.pending_break = ""
            self.pending_space = None
        elif self.pending_space is not None:
            space_node, space_cp = self.pending_space
            self._segment(space_node, space_cp, " ")
            self.pending_space = None
        self._segment(node, cp, chunk)
        self.at_line_start = False

    def _segment(self, node: int, cp: int, chunk: str) -> None:
        # extend the previous run when this chunk continues it in both the text and the node
        if (
            self.seg_len
            and self.seg_node[-1] == node
            and self.seg_cp[-1] + self.seg_len[-1] == cp
            and self.seg_vis[-1] + self.seg_len[-1] == self.vis
        ):
            self.seg_len[-1] += len(chunk)
        else:
            self.seg_vis.append(self.vis)
            self.seg_node.append(node)
            self.seg_cp.append(cp)
            self.seg_len.append(len(chunk))
        self.pieces.append(chunk)
        self.vis += len(chunk)

    def brk(self, kind: str) -> None:
        """Owe a line or block break before the next visible text (the stronger one wins)."""
        if len(kind) > len(self.pending_break):
            self.pending_break = kind
        self.pending_space = None
        self.at_line_start = True

    def visible_text(self, node: int, data: str, preformatted: bool) -> None:
        """Add a visible text node, collapsing white space as CSS `white-space: normal` does."""
        if preformatted:
            self._emit(node, 0, data)
            self.at_line_start = data.endswith("\n")
            return
        cursor = 0
        for m in _COLLAPSE.finditer(data):
            a, b = m.span()
            if a > cursor:
                self._emit(node, cursor, data[cursor:a].translate(_WS_TO_SPACE))
            if not self.at_line_start and self.pending_space is None and not self.pending_break:
                last = self.pieces[-1] if self.pieces else ""
                if last and not last.endswith(" "):
                    self.pending_space = (node, a)
            cursor = b
        if cursor < len(data):
            self._emit(node, cursor, data[cursor:].translate(_WS_TO_SPACE))

    # ---- the walk ----
    def walk(self, first: Any) -> None:
        """Walk the siblings from `first` (the root's first child) and everything under them.

        Children are handled parent by parent, so that same-named siblings are counted after
        sanitizing (dropped nodes, merged text). A stack of levels, not recursion: pages nest
        hundreds of elements deep (Chromium keeps 512 levels), past Python's recursion limit.
        """
        stack = [_Level(first, "", hidden=False, pre=False, block=False)]
        while stack:
            level = stack[-1]
            child = level.child
            if child is None:
                self._flush(level)
                stack.pop()
                if level.block:
                    self.brk(BLOCK_BREAK)
                continue
            level.child = child.next
            if child.is_text_node:
                level.text.append(child.text_content or "")
                continue
            if child.is_comment_node or not child.is_element_node or _dropped(child):
                continue  # removed by sanitize-html: the text around it merges
            self._flush(level)
            inner = self._element(child, level)
            if inner is not None:
                stack.append(inner)

    def _flush(self, level: _Level) -> None:
        """Add the text gathered since the level's last element as one text node."""
        if level.text:
            self._text("".join(level.text), level.prefix, level.counters, level.hidden, level.pre)
            level.text.clear()

    def _text(self, data: str, prefix: str, counters: dict[str, int], hidden: bool, pre: bool) -> None:
        if not data:
            return
        n = counters["text()"] = counters.get("text()", 0) + 1
        index = len(self.nodes)
        self.nodes.append(TextNode(f"{prefix}/text()[{n}]", data, self.pos, not hidden))
        self.pos += len(data)
        if not hidden:
            self.visible_text(index, data, pre)

    def _element(self, el: Any, parent: _Level) -> _Level | None:
        """Count an element; return the level of its children, None when it has none."""
        name = str(el.tag).lower()
        n = parent.counters[name] = parent.counters.get(name, 0) + 1
        path = f"{parent.prefix}/{name}[{n}]"
        self.element_starts.setdefault(path, self.pos)
        if name == "br":
            self.pos += 1
            if not parent.hidden:
                self.brk(LINE_BREAK)
            return None
        attrs = el.attributes if (el.attributes and not parent.hidden) else {}
        style = str(attrs.get("style") or "")
        hide = (
            parent.hidden
            or name in _HIDDEN
            or "hidden" in attrs
            or bool(style and _HIDDEN_STYLE.search(style))
        )
        keep = parent.pre or name in _PREFORMATTED or bool(style and _PRE_STYLE.search(style))
        block = name in _BLOCKS and not hide
        if block:
            self.brk(BLOCK_BREAK)
        if el.child is None:
            if block:
                self.brk(BLOCK_BREAK)
            return None
        return _Level(el.child, path, hidden=hide, pre=keep, block=block)

    def build(self) -> HtmlDocument:
        """Return the document model."""
        return HtmlDocument(
            self.nodes,
            self.element_starts,
            self.pos,
            "".join(self.pieces),
            (self.seg_vis, self.seg_node, self.seg_cp, self.seg_len),
        )


def _dropped(el: Any) -> bool:
    """Return True for an element sanitize-html removes with its content."""
    name = str(el.tag).lower()
    if name not in _DROPPED:
        return False
    if name == "iframe":
        src = str((el.attributes or {}).get("src") or "")
        try:
            url = urlsplit(src)
        except ValueError:
            return True
        return not (url.scheme == "https" and url.hostname in _IFRAME_HOSTS)
    return True


@functools.lru_cache(maxsize=64)
def parse_html(html: str, inline: bool = False) -> HtmlDocument:
    """Return the model of an HTML value as Label Studio's labeling page shows it (cached by value).

    `inline=False` (HyperText's default) renders the value as a whole document in an iframe and
    addresses regions from its <body>; `inline=True` parses it as a fragment inside a <div>.
    """
    from selectolax.lexbor import LexborHTMLParser

    builder = _Builder()
    if inline:
        parser = LexborHTMLParser(html, is_fragment=True, scripting=True)
        first = parser.root
    else:
        parser = LexborHTMLParser(html, scripting=True)
        body = parser.body
        first = body.child if body is not None else None
    if first is not None:
        builder.walk(first)
    return builder.build()


def paragraph_texts(value: Any, text_key: str = "text") -> list[str]:
    """Return the text of each paragraph of a Paragraphs value (a list of objects); raise ValueError otherwise.

    A lone surrogate (JSON allows "\ud83d", e.g. a chat export cut inside an emoji) becomes U+FFFD, one
    for one: both are one UTF-16 unit, so offsets stay the editor's, and models cannot take it as is.
    """
    if not isinstance(value, list):
        raise ValueError(f"Paragraphs data must be a list of objects, got {type(value).__name__}")
    texts = []
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise ValueError(f"paragraph {i} is a {type(entry).__name__}, not an object")
        raw = entry.get(text_key)
        text = "" if raw is None else str(raw)
        texts.append(text if text.isascii() else LONE_SURROGATE.sub("\ufffd", text))
    return texts

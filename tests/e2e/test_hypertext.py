"""HyperText and Paragraphs NER against a real Label Studio 1.23.2, checked on its labeling page in chromium.

What is proven here, on the page annotators use (not only in the stored JSON):
- the words each predicted span highlights are exactly the expected entities, for an inline JSON task, an
  uploaded `.html` file with indentation and line breaks, an `inline="true"` HyperText, and a dialogue;
- our model of the document (text nodes, XPaths, global offsets) equals the DOM the page built, node for
  node, after Label Studio's sanitizing (comments, scripts and iframes dropped, text merged);
- Label Studio stores inline, uploaded and URL-imported HTML verbatim (no minification in 1.23.2);
- the editor reads XPath offsets and Paragraphs offsets in UTF-16 code units and globalOffsets in code
  points: a probe prediction with code point offsets after an emoji highlights shifted text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.results.hypertext import parse_html
from serving.results.utf16 import utf16_offset
from tests.e2e.conftest import Project, connect
from tests.e2e.ls_harness import Chromium, LabelStudio, MLServer
from tests.e2e.test_browser import open_task, save_screenshot
from tests.support.httpserver import LocalServer, static

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hypertext"
ARTICLE = (FIXTURES / "article.html").read_text(encoding="utf-8")

_LABELS = """
    <Label value="Person" background="red"/>
    <Label value="Organization" background="darkorange"/>
    <Label value="Location" background="orange"/>"""
HT_CONFIG = f"""<View>
  <HyperTextLabels name="ner" toName="html">{_LABELS}
  </HyperTextLabels>
  <HyperText name="html" value="$html"/>
</View>"""
HT_INLINE_CONFIG = HT_CONFIG.replace('value="$html"/>', 'value="$html" inline="true"/>')
DIALOGUE_CONFIG = f"""<View>
  <ParagraphLabels name="ner" toName="dialogue">{_LABELS}
  </ParagraphLabels>
  <Paragraphs name="dialogue" value="$dialogue" layout="dialogue" nameKey="speaker" textKey="line"/>
</View>"""
PROBE_CONFIG = f"""<View>
  <HyperTextLabels name="ht_ner" toName="html">{_LABELS}
  </HyperTextLabels>
  <HyperText name="html" value="$html"/>
  <ParagraphLabels name="p_ner" toName="dialogue">{_LABELS}
  </ParagraphLabels>
  <Paragraphs name="dialogue" value="$dialogue"/>
</View>"""

# Inline JSON task: what the page's sanitizer and parser change is all here (comments and a script inside
# text, an iframe, CRLF, &nbsp;, implied </p> and <tbody>, upper-case tags, hidden text, <br>, <style>).
INLINE_HTML = (
    "<html><head><title>Board notes</title><style>p { color: #333 }</style></head><body>"
    '<DIV class="note">\r\n  <P>Tim Cook<!-- CEO --> of <b>Apple</b> spoke in <i>San&nbsp;Francisco</i> and Tokyo.\r\n'
    '  <p>Good news 😀 everyone: Barack <a href="#">Obama</a> arrived in Berlin.<br>Sundar Pichai of Google'
    "<script>document.title = 'Elon Musk';</script> replied.</p>\r\n"
    "  <table><tr><td>Satya Nadella</td><td>Microsoft</td></tr></table>"
    '<iframe src="http://127.0.0.1:9/ad"></iframe><div hidden>Jeff Bezos</div>'
    "<style>.x { color: red }</style></DIV></body></html>"
)
INLINE_ENTITIES = [
    ("Person", "Tim Cook"),
    ("Organization", "Apple"),
    ("Location", "San\xa0Francisco"),
    ("Location", "Tokyo"),
    ("Person", "Barack Obama"),
    ("Location", "Berlin"),
    ("Person", "Sundar Pichai"),
    ("Person", "Satya Nadella"),
    ("Organization", "Microsoft"),
]
ARTICLE_ENTITIES = [
    ("Location", "Geneva"),
    ("Person", "Angela Merkel"),  # "Angela\n        Merkel" in the file: one word break inside <b>
    ("Person", "Emmanuel Macron"),
    ("Organization", "United Nations"),
    ("Person", "Barack Obama"),
    ("Location", "Washington"),
    ("Person", "Tim Cook"),  # after an emoji: UTF-16 offsets differ from code points here
    ("Location", "Berlin"),
]
DIALOGUE = [
    {"speaker": "Alice", "line": "Hello 😀 I met Barack Obama in Paris."},
    {"speaker": "Bob", "line": "We met Angela Merkel in Berlin."},
    {"speaker": "Alice", "line": "Yes, then Tokyo."},
]
DIALOGUE_ENTITIES = [
    ("Person", "Barack Obama"),
    ("Location", "Paris"),
    ("Person", "Angela Merkel"),
    ("Location", "Berlin"),
    ("Location", "Tokyo"),
]

# Each highlighted region's text, read from the page (the iframe of a HyperText, or the page itself):
# a HyperText region's spans share a per-region class; a Paragraphs region here is one span.
HIGHLIGHTS = r"""(() => {
  const docs = [document];
  for (const f of document.querySelectorAll('iframe')) {
    try { if (f.contentDocument && f.contentDocument.body) docs.push(f.contentDocument); } catch (e) {}
  }
  const regions = new Map();
  let n = 0;
  docs.forEach((doc, d) => {
    for (const span of doc.querySelectorAll('span.htx-highlight')) {
      if (span.parentElement && span.parentElement.closest('span.htx-highlight')) continue;
      const own = Array.from(span.classList).find(c => /^htx-highlight-(?!last$)/.test(c));
      const key = own ? d + ':' + own : 'span:' + (n++);
      regions.set(key, (regions.get(key) || '') + span.textContent);
    }
  });
  return {text: document.body ? document.body.innerText : '', regions: Array.from(regions.values())};
})()"""

# The HyperText root as the page holds it (iframe body, or the inline div), with the highlight spans
# unwrapped: every text node's XPath (same-named siblings counted from 1), data and global offset.
DOM_MODEL = r"""(() => {
  const frame = Array.from(document.querySelectorAll('iframe')).find(
    f => f.contentDocument && f.contentDocument.querySelector('span.htx-highlight'));
  const span = document.querySelector('span.htx-highlight');
  const root = frame ? frame.contentDocument.body : span && span.closest('[class*="richtext__container"]');
  if (!root) return null;
  const clone = root.cloneNode(true);
  for (const span of Array.from(clone.querySelectorAll('span.htx-highlight'))) span.replaceWith(...span.childNodes);
  clone.normalize();
  const out = [];
  let pos = 0;
  const walk = (node, prefix) => {
    const counters = {};
    for (const c of node.childNodes) {
      const name = c.nodeType === 3 ? 'text()' : c.nodeName.toLowerCase();
      counters[name] = (counters[name] || 0) + 1;
      const path = `${prefix}/${name}[${counters[name]}]`;
      if (c.nodeType === 3) { out.push([path, c.data, pos]); pos += Array.from(c.data).length; }
      else { if (c.nodeName === 'BR') pos += 1; walk(c, path); }
    }
  };
  walk(clone, '');
  return out;
})()"""


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def browser(browser_ready: str, label_studio: LabelStudio, e2e_root: Path) -> Iterator[Chromium]:
    """Start chromium logged in to Label Studio; stop it afterwards."""
    chromium = Chromium(e2e_root / "chromium-hypertext")
    chromium.root.mkdir(parents=True, exist_ok=True)
    try:
        chromium.start()
        chromium.set_cookie(label_studio.url, "sessionid", label_studio.login_session())
        yield chromium
    finally:
        chromium.stop()


@pytest.fixture(scope="module")
def article_server() -> Iterator[LocalServer]:
    """Serve article.html over HTTP on loopback, for Label Studio's import-from-URL."""
    server = LocalServer({"/article.html": static(ARTICLE.encode("utf-8"), "text/html; charset=utf-8")})
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def html_project(label_studio: LabelStudio, ml_server: MLServer, article_server: LocalServer) -> Project:
    """A HyperText project: one inline JSON task, one uploaded .html file, one .html imported from a URL."""
    project = label_studio.create_project("e2e HyperText", HT_CONFIG)
    pid = int(project["id"])
    ml_id = connect(label_studio, ml_server, pid)
    (inline,) = label_studio.import_json(pid, [{"data": {"html": INLINE_HTML}}])
    (uploaded,) = label_studio.import_file(pid, "article.html", ARTICLE.encode("utf-8"), "text/html")
    before = set(label_studio.task_ids(pid))
    label_studio.api(
        "POST", f"/api/projects/{pid}/import", data={"url": f"{article_server.url}/article.html"}
    )
    (from_url,) = sorted(set(label_studio.task_ids(pid)) - before)
    return Project(pid, ml_id, HT_CONFIG, [inline, uploaded, from_url])


@pytest.fixture(scope="module")
def inline_project(label_studio: LabelStudio, ml_server: MLServer) -> Project:
    """A HyperText project with inline="true": the value is parsed as a fragment inside a <div>."""
    project = label_studio.create_project("e2e HyperText inline", HT_INLINE_CONFIG)
    pid = int(project["id"])
    ml_id = connect(label_studio, ml_server, pid)
    ids = label_studio.import_json(pid, [{"data": {"html": INLINE_HTML}}])
    return Project(pid, ml_id, HT_INLINE_CONFIG, ids)


@pytest.fixture(scope="module")
def dialogue_project(label_studio: LabelStudio, ml_server: MLServer) -> Project:
    """A Paragraphs dialogue project (nameKey="speaker", textKey="line")."""
    project = label_studio.create_project("e2e dialogue", DIALOGUE_CONFIG)
    pid = int(project["id"])
    ml_id = connect(label_studio, ml_server, pid)
    ids = label_studio.import_json(pid, [{"data": {"dialogue": DIALOGUE}}])
    return Project(pid, ml_id, DIALOGUE_CONFIG, ids)


def _predicted(ls: LabelStudio, project: Project, task_id: int) -> list[dict[str, Any]]:
    """Run "Retrieve predictions" (idempotent) and return the task's single prediction's regions."""
    ls.retrieve_predictions(project.id)
    predictions = ls.predictions(task_id)
    assert len(predictions) == 1 and predictions[0]["result"], predictions
    return list(predictions[0]["result"])


def _entities(result: list[dict[str, Any]], key: str) -> list[tuple[str, str]]:
    return [(r["value"][key][0], r["value"]["text"]) for r in result]


def _highlights(browser: Chromium, count: int, what: str) -> list[str]:
    """Wait until the page shows `count` highlighted regions (stable) and return their texts."""
    state = browser.wait_for(
        HIGHLIGHTS, lambda s: isinstance(s, dict) and len(s["regions"]) == count, what, timeout=120
    )
    return list(state["regions"])


def test_label_studio_stores_html_verbatim(label_studio: LabelStudio, html_project: Project) -> None:
    """Label Studio 1.23.2 minifies nothing: inline JSON, an uploaded file and a URL import keep every byte."""
    inline, uploaded, from_url = html_project.task_ids
    assert label_studio.task_data(html_project.id, inline) == {"html": INLINE_HTML}
    # the uploaded file's body becomes the value of the config's only data key, indentation and all
    assert label_studio.task_data(html_project.id, uploaded) == {"html": ARTICLE}
    assert label_studio.task_data(html_project.id, from_url) == {"html": ARTICLE}


@pytest.mark.parametrize(
    ("index", "html", "entities", "shot"),
    [
        (0, INLINE_HTML, INLINE_ENTITIES, "labeling-hypertext-inline-task"),
        (1, ARTICLE, ARTICLE_ENTITIES, "labeling-hypertext"),
    ],
    ids=["inline-json-task", "uploaded-html-file"],
)
def test_hypertext_page_highlights_the_predicted_words(
    browser: Chromium,
    label_studio: LabelStudio,
    html_project: Project,
    artifacts_dir: Path,
    index: int,
    html: str,
    entities: list[tuple[str, str]],
    shot: str,
) -> None:
    """Each predicted XPath range highlights exactly its entity on the labeling page; the DOM is our model."""
    task_id = html_project.task_ids[index]
    result = _predicted(label_studio, html_project, task_id)
    assert _entities(result, "hypertextlabels") == entities
    open_task(browser, label_studio, html_project, task_id)
    shown = _highlights(browser, len(entities), f"{len(entities)} highlighted HyperText regions")
    assert sorted(_norm(t) for t in shown) == sorted(_norm(text) for _, text in entities)
    # node for node, the page's document is the one our offsets were computed on
    dom = [tuple(node) for node in browser.evaluate(DOM_MODEL)]
    assert dom == [(n.path, n.data, n.start) for n in parse_html(html).nodes]
    save_screenshot(browser, artifacts_dir, shot, lambda s: len(browser.evaluate(HIGHLIGHTS)["regions"]) > 0)


def test_url_imported_html_gets_the_same_ranges(label_studio: LabelStudio, html_project: Project) -> None:
    """The document imported from a URL is stored like the uploaded one, so its ranges are the same."""
    _, uploaded, from_url = html_project.task_ids
    strip = ("start", "startOffset", "end", "endOffset", "globalOffsets", "text", "hypertextlabels")
    ranges = [
        [{k: r["value"][k] for k in strip} for r in _predicted(label_studio, html_project, t)]
        for t in (uploaded, from_url)
    ]
    assert ranges[0] == ranges[1]


def test_inline_hypertext_is_a_fragment_in_a_div(
    browser: Chromium, label_studio: LabelStudio, inline_project: Project
) -> None:
    """inline="true": <title>/<style> of the head become nodes of the div, and the ranges follow."""
    task_id = inline_project.task_ids[0]
    result = _predicted(label_studio, inline_project, task_id)
    assert _entities(result, "hypertextlabels") == INLINE_ENTITIES
    assert result[0]["value"]["globalOffsets"]["start"] == 31  # after "Board notes" + the head's CSS
    open_task(browser, label_studio, inline_project, task_id)
    shown = _highlights(browser, len(INLINE_ENTITIES), "highlighted regions of the inline HyperText")
    assert sorted(_norm(t) for t in shown) == sorted(_norm(text) for _, text in INLINE_ENTITIES)
    dom = [tuple(node) for node in browser.evaluate(DOM_MODEL)]
    assert dom == [(n.path, n.data, n.start) for n in parse_html(INLINE_HTML, inline=True).nodes]


def test_dialogue_page_highlights_the_predicted_words(
    browser: Chromium, label_studio: LabelStudio, dialogue_project: Project, artifacts_dir: Path
) -> None:
    """Paragraphs: regions by paragraph index (a string) + UTF-16 offsets land on the entities; no speakers."""
    task_id = dialogue_project.task_ids[0]
    result = _predicted(label_studio, dialogue_project, task_id)
    assert _entities(result, "paragraphlabels") == DIALOGUE_ENTITIES
    assert [(r["value"]["start"], r["value"]["end"]) for r in result] == [
        ("0", "0"),
        ("0", "0"),
        ("1", "1"),
        ("1", "1"),
        ("2", "2"),
    ]
    open_task(browser, label_studio, dialogue_project, task_id)
    shown = _highlights(browser, len(DIALOGUE_ENTITIES), "highlighted dialogue regions")
    assert sorted(shown) == sorted(text for _, text in DIALOGUE_ENTITIES)
    save_screenshot(browser, artifacts_dir, "labeling-paragraphs", lambda s: "Angela Merkel" in s["text"])


def test_editor_counts_offsets_in_utf16_and_global_offsets_in_code_points(
    browser: Chromium, label_studio: LabelStudio
) -> None:
    """A probe prediction (no backend): code point offsets after an emoji highlight one unit too early.

    Region A: HyperText XPath offsets counted in code points. Region B: a broken XPath with
    globalOffsets in code points (the editor falls back to them). Region C: Paragraphs offsets in
    code points. If the editor counted code points, A and C would highlight "Tim Cook" and
    "Barack Obama"; it counts UTF-16 units, so they start one unit early. B lands exactly.
    """
    html = "<p>Good news 😀 everyone: Tim Cook arrived.</p>"
    line = "Hello 😀 I met Barack Obama in Paris."
    node = parse_html(html).nodes[0]
    cp = node.data.index("Tim Cook")
    assert utf16_offset(node.data, cp) == cp + 1
    arrived = node.data.index("arrived")
    pcp = line.index("Barack Obama")

    def labels(key: str) -> dict[str, list[str]]:
        return {key: ["Person"]}

    result = [
        {
            "id": "a",
            "from_name": "ht_ner",
            "to_name": "html",
            "type": "hypertextlabels",
            "value": {"start": node.path, "startOffset": cp, "end": node.path, "endOffset": cp + 8}
            | labels("hypertextlabels"),
        },
        {
            "id": "b",
            "from_name": "ht_ner",
            "to_name": "html",
            "type": "hypertextlabels",
            "value": {
                "start": "/p[9]/text()[1]",
                "startOffset": 0,
                "end": "/p[9]/text()[1]",
                "endOffset": 7,
                "globalOffsets": {"start": node.start + arrived, "end": node.start + arrived + 7},
            }
            | labels("hypertextlabels"),
        },
        {
            "id": "c",
            "from_name": "p_ner",
            "to_name": "dialogue",
            "type": "paragraphlabels",
            "value": {"start": "0", "end": "0", "startOffset": pcp, "endOffset": pcp + 12}
            | labels("paragraphlabels"),
        },
    ]
    project = label_studio.create_project("e2e offsets probe", PROBE_CONFIG)
    pid = int(project["id"])
    data = {"html": html, "dialogue": [{"author": "Alice", "text": line}]}
    (task_id,) = label_studio.import_json(
        pid, [{"data": data, "predictions": [{"model_version": "probe", "result": result}]}]
    )
    open_task(browser, label_studio, Project(pid, 0, PROBE_CONFIG, [task_id]), task_id)
    shown = _highlights(browser, 3, "the three probe regions")
    utf16 = node.data.encode("utf-16-le")
    early = utf16[2 * cp : 2 * (cp + 8)].decode("utf-16-le")  # what UTF-16 offsets cp..cp+8 select
    line16 = line.encode("utf-16-le")
    early_p = line16[2 * pcp : 2 * (pcp + 12)].decode("utf-16-le")
    assert early == " Tim Coo" and early_p == " Barack Obam"
    assert sorted(shown) == sorted([early, "arrived", early_p])

"""Own labels against a real Label Studio 1.23.2: its *HTML entity recognition* template, routed to GLiNER.

Our server runs as a real process with a tiny random GLiNER (tests/backends/_gliner_support.py) as
ZERO_SHOT_NER_MODEL and nothing named on the tag: the template's labels (Title, Author, Body) are no
NER type, so routing sends the tag to GLiNER. "Retrieve predictions" must store one valid prediction per
task, of our model_version, whose XPath ranges Label Studio accepts and whose text is the page's text
at those ranges (the random model's spans are not planted: what is proven is the path, not the answer;
the answers are exact in tests/backends/test_zero_shot_ner.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import connect
from tests.e2e.ls_harness import LabelStudio, MLServer
from tests.e2e.test_label_studio import assert_valid_prediction, only_prediction, our_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
pytest.importorskip("gliner")

# Label Studio 1.23.2's "HTML Entity Recognition" template, as its template gallery creates it
HTML_NER = """<View>
  <HyperTextLabels name="ner" toName="text">
    <Label value="Title" background="green"/>
    <Label value="Author" background="blue"/>
    <Label value="Body" background="yellow"/>
  </HyperTextLabels>

  <View style="border: 1px solid #CCC;
               border-radius: 10px;
               padding: 5px">
    <HyperText name="text" value="$html"/>
  </View>
</View>"""
PAGES = [
    "<h1>Black holes</h1><p>by <b>Jane Doe</b></p><p>Nothing escapes a black hole, not even light.</p>",
    "<h2>Hawking radiation</h2><p>Written by Stephen Hawking.</p><p>Black holes emit radiation 😀 slowly.</p>",
]


@pytest.fixture(scope="module")
def gliner_server(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[MLServer]:
    """Start our server with the tiny GLiNER as the zero-shot NER model (its own process)."""
    from tests.backends._gliner_support import save_gliner

    model = save_gliner(e2e_root / "gliner" / "tiny-gliner")
    root = e2e_root / "ml-own-labels"
    server = MLServer(
        root,
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "WARMUP": "zero_shot_ner",
            "ZERO_SHOT_NER_MODEL": str(model),
        },
    )
    root.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-own-labels.log")


def test_html_entity_recognition_template_gets_gliner_predictions(
    label_studio: LabelStudio, gliner_server: MLServer
) -> None:
    project = label_studio.create_project("e2e own labels (HTML NER)", HTML_NER)
    connect(label_studio, gliner_server, int(project["id"]))
    ids = label_studio.import_json(int(project["id"]), [{"data": {"html": html}} for html in PAGES])
    version = our_version(gliner_server, HTML_NER)
    assert version.startswith("zero_shot_ner")
    label_studio.retrieve_predictions(int(project["id"]))
    regions = 0
    for task_id, html in zip(ids, PAGES, strict=True):
        prediction = only_prediction(label_studio, task_id, version)
        assert_valid_prediction(HTML_NER, prediction, {"html": html})
        for item in prediction["result"]:
            assert item["type"] == "hypertextlabels" and item["from_name"] == "ner"
            assert set(item["value"]["hypertextlabels"]) <= {"Title", "Author", "Body"}
        regions += len(prediction["result"])
    assert regions > 0  # GLiNER answered (random weights score every span about 0.56, above 0.5)

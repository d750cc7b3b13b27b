"""Whisper transcription through the server: whole-file TextArea, segments with per-region text, long files."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from backends.audio_transcription import Segment, TranscriptionBackend, chunk_spans, stitch
from serving.fetch.audio import Audio
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.settings import Settings
from tests.backends._audio_support import tone
from tests.backends._ocr_support import validate
from tests.backends._whisper_support import EOT, LANG, build_whisper, plant, text_ids, ts

ASR = """<View>
  <Audio name="audio" value="$audio" zoom="true" hotkey="ctrl+enter" />
  <Header value="Transcribe the audio" />
  <TextArea name="transcription" toName="audio" rows="4" editable="true" maxSubmissions="1" %s/>
</View>"""

SEGMENTS = """<View>
  <Labels name="labels" toName="audio">
    <Label value="Speech" />
    <Label value="Noise" />
  </Labels>
  <Audio name="audio" value="$audio"/>
  <TextArea name="transcription" toName="audio" rows="2" editable="true" perRegion="true" required="true" />
</View>"""

CLIPS: dict[str, np.ndarray] = {
    "three.wav": tone(300, 3.0),
    "ten-minutes.wav": tone(200, 600.0, amplitude=0.1),
}


class ClipResolver:
    """Serve the generated clips by URL name, as the data resolver would after decoding."""

    def load_audio(self, value: str, task_id: int | None = None, *, sample_rate: int = 16000) -> Audio:
        """Return the clip named by the URL's last path part at 16 kHz."""
        assert sample_rate == 16000
        return Audio(CLIPS[value.rsplit("/", 1)[-1]], 16000)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny Whisper once for the module."""
    return build_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture
def server(whisper_dir: Path, tmp_path: Path) -> Iterator[tuple[FlaskClient, Runtime]]:
    """Build the app over the transcription family alone, WHISPER_MODEL pointing at the tiny model."""
    settings = Settings(model_dir=str(tmp_path), whisper_model=str(whisper_dir), max_wait_ms=2.0)
    runtime = Runtime(
        settings, families={"audio_transcription": TranscriptionBackend}, resolver=ClipResolver()
    )
    app = create_app(settings, runtime=runtime)
    with app.test_client() as client:
        yield client, runtime
    runtime.close()


def _backend(runtime: Runtime, config: str, client: FlaskClient) -> TranscriptionBackend:
    """Let /setup plan the config, wait for its one model to load and return the loaded instance."""
    response = client.post("/setup", json={"schema": config, "project": "1.1"})
    assert response.status_code == 200, response.get_json()
    (spec,) = runtime.plan(config).specs
    slot = runtime.slot(spec)
    assert slot.ready.wait(60)
    backend = slot.backend
    assert isinstance(backend, TranscriptionBackend) and backend.model is not None
    return backend


def _predict(client: FlaskClient, config: str, names: list[str]) -> list[dict[str, Any]]:
    tasks = [{"id": i + 1, "data": {"audio": f"http://ls/data/{n}"}} for i, n in enumerate(names)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert response.status_code == 200, response.get_json()
    results: list[dict[str, Any]] = response.get_json()["results"]
    assert len(results) == len(tasks)
    for result in results:
        assert validate(config, result["result"]) == []
    return results


def test_chunk_spans_cover_the_file_with_overlap() -> None:
    """30 s chunks every 25 s; the last one ends at the file's end; a short file is one chunk."""
    assert chunk_spans(12.0, 30.0, 5.0) == [(0.0, 12.0)]
    spans = chunk_spans(600.0, 30.0, 5.0)
    assert len(spans) == 24
    assert spans[0] == (0.0, 30.0) and spans[-1] == (575.0, 25.0)
    assert all(b[0] - a[0] == 25.0 for a, b in itertools.pairwise(spans))


def test_stitch_keeps_each_stretch_once_and_trims_overlaps() -> None:
    """Both chunks hear 25-30 s: what starts before 27.5 s comes from chunk 0, what it covers is not repeated."""
    first = [Segment(0.0, 12.0, "a", 0.9), Segment(12.0, 26.0, "b", 0.8), Segment(26.0, 30.0, "c", 0.7)]
    second = [Segment(0.0, 1.5, "b-again", 0.6), Segment(0.5, 4.0, "c2", 0.5), Segment(4.0, 9.0, "d", 0.4)]
    out = stitch([(0.0, 30.0, first), (25.0, 9.0, second)], 5.0, 34.0)
    assert [(s.start, s.end, s.text) for s in out] == [
        (0.0, 12.0, "a"),
        (12.0, 26.0, "b"),
        (26.0, 30.0, "c"),
        (30.0, 34.0, "d"),
    ]


def test_stitch_leaves_a_segment_cut_by_the_chunk_end_to_the_next_chunk() -> None:
    """Chunk 0 ends inside "c" (no closing timestamp, it starts in the overlap): chunk 1's whole "c" is kept."""
    first = [Segment(0.0, 26.0, "a b", 0.9), Segment(26.0, 30.0, "c", 0.7, open=True)]
    second = [Segment(1.0, 7.0, "c d", 0.5)]
    out = stitch([(0.0, 30.0, first), (25.0, 9.0, second)], 5.0, 34.0)
    assert [(s.start, s.end, s.text) for s in out] == [(0.0, 26.0, "a b"), (26.0, 32.0, "c d")]


def test_whole_transcript_in_the_textarea(server: tuple[FlaskClient, Runtime]) -> None:
    """A planted "<|0.00|>hello world<|2.50|>" is the TextArea's text, scored by the model."""
    client, runtime = server
    config = ASR % 'model_language="de"'
    backend = _backend(runtime, config, client)
    calls = plant(backend, [[LANG["de"], ts(0), *text_ids(" hello world"), ts(2.5), EOT]])
    (result,) = _predict(client, config, ["three.wav"])
    (item,) = result["result"]
    assert item["from_name"] == "transcription" and item["type"] == "textarea"
    assert item["value"] == {"text": ["hello world"]}
    assert 0.0 < item["score"] <= 1.0
    assert calls == [{"rows": 1, "language": ["de"]}]
    assert result["model_version"].startswith("audio_transcription")


def test_segments_become_labeled_regions_with_their_text(server: tuple[FlaskClient, Runtime]) -> None:
    """Two planted segments: two Speech regions (seconds) and their text under the same ids."""
    client, runtime = server
    backend = _backend(runtime, SEGMENTS, client)
    plant(backend, [[ts(0.2), *text_ids(" one"), ts(1.0), ts(1.4), *text_ids(" two"), ts(2.6), EOT]])
    (result,) = _predict(client, SEGMENTS, ["three.wav"])
    items = result["result"]
    labels = [i for i in items if i["type"] == "labels"]
    texts = {i["id"]: i for i in items if i["type"] == "textarea"}
    assert [(i["value"]["start"], i["value"]["end"], i["value"]["labels"]) for i in labels] == [
        (0.2, 1.0, ["Speech"]),
        (1.4, 2.6, ["Speech"]),
    ]
    assert [texts[i["id"]]["value"]["text"] for i in labels] == [["one"], ["two"]]
    assert all(texts[i["id"]]["from_name"] == "transcription" for i in labels)
    assert all(i["to_name"] == "audio" and i["original_length"] == 3.0 for i in items)


def test_ten_minutes_are_chunked_batched_and_stitched(server: tuple[FlaskClient, Runtime]) -> None:
    """24 chunks of a 600 s file, each planted with the 5 s segments it hears: 120 segments once each, in order."""
    client, runtime = server
    backend = _backend(runtime, SEGMENTS, client)
    answers = []
    for offset, length in chunk_spans(600.0, 30.0, 5.0):
        first = round(offset / 5)
        row: list[int] = []
        for n in range(first, first + round(length / 5)):
            row += [ts(5 * n - offset), *text_ids(f" s{n}"), ts(5 * n + 5 - offset)]
        answers.append([*row, EOT])
    calls = plant(backend, answers)
    (result,) = _predict(client, SEGMENTS, ["ten-minutes.wav"])
    labels = [i for i in result["result"] if i["type"] == "labels"]
    texts = {i["id"]: i["value"]["text"][0] for i in result["result"] if i["type"] == "textarea"}
    assert [(i["value"]["start"], i["value"]["end"]) for i in labels] == [
        (5.0 * n, 5.0 * n + 5) for n in range(120)
    ]
    assert [texts[i["id"]] for i in labels] == [f"s{n}" for n in range(120)]
    assert [c["rows"] for c in calls] == [16, 8]  # chunk_batch chunks per generate() call


def test_real_generate_gives_valid_regions(
    server: tuple[FlaskClient, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The random model's own generations (language detected) parse into valid, ordered regions."""
    monkeypatch.setattr(TranscriptionBackend, "max_new_tokens", 24)
    client, _ = server
    (result,) = _predict(client, SEGMENTS, ["three.wav"])
    labels = [i["value"] for i in result["result"] if i["type"] == "labels"]
    ends = [0.0] + [v["end"] for v in labels]
    assert all(ends[k] <= v["start"] <= v["end"] <= 3.0 for k, v in enumerate(labels))

"""Transcription against a real Label Studio 1.23.2: its Automatic Speech Recognition and ASR-using-segments templates.

Our server runs as a real process on a tiny Whisper whose weights were set to transcribe any audio as
one fixed segment (tests/backends/_whisper_support.plant_transcript). The wav files are uploaded to
Label Studio, which the server downloads them from: "Retrieve predictions" must store one valid
prediction per task, the labeling page must list the segment's region.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backends._audio_support import encode, tone, wav_bytes
from tests.backends._whisper_support import build_whisper, plant_transcript
from tests.e2e.conftest import Project, connect
from tests.e2e.ls_harness import Chromium, LabelStudio, MLServer
from tests.e2e.test_browser import PAGE_STATE, open_task, save_screenshot
from tests.e2e.test_browser import browser as browser  # the fixture, for this module
from tests.e2e.test_label_studio import assert_valid_prediction, only_prediction, our_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Label Studio 1.23.2's templates, as its template gallery creates them.
ASR = """<View>
  <Audio name="audio" value="$audio" zoom="true" hotkey="ctrl+enter" />
  <Header value="Transcribe the audio" />
  <TextArea name="transcription" toName="audio"
            rows="4" editable="true" maxSubmissions="1" />
</View>"""
SEGMENTS = """<View>
  <Labels name="labels" toName="audio">
    <Label value="Speech" />
    <Label value="Noise" />
  </Labels>

  <Audio name="audio" value="$audio"/>

  <TextArea name="transcription" toName="audio"
            rows="2" editable="true"
            perRegion="true" required="true" />
</View>"""
TEXT = "Hi, Bob."
END_S = 1.5


@pytest.fixture(scope="module")
def asr_server(e2e_root: Path, label_studio: LabelStudio, artifacts_dir: Path) -> Iterator[MLServer]:
    """Start our server with the planted Whisper (its own process, beside the session's)."""
    whisper = e2e_root / "whisper"
    plant_transcript(build_whisper(whisper, d_model=32, tied=False), TEXT, END_S)
    root = e2e_root / "ml-audio"
    server = MLServer(
        root,
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.token,
            "WARMUP": "audio_transcription",
            "WHISPER_MODEL": str(whisper),
        },
    )
    root.mkdir(parents=True, exist_ok=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.proc is not None:
            shutil.copyfile(server.proc.log_path, artifacts_dir / "ml-audio.log")


def _of(prediction: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [item for item in prediction["result"] if item["type"] == kind]


def test_automatic_speech_recognition_template(label_studio: LabelStudio, asr_server: MLServer) -> None:
    """A wav and an mp3 upload: one stored prediction each, the transcript in the TextArea, valid for the config."""
    project = int(label_studio.create_project("e2e asr", ASR)["id"])
    connect(label_studio, asr_server, project)
    ids = label_studio.import_file(project, "one.wav", wav_bytes(tone(300, 3.0)), "audio/wav")
    ids += label_studio.import_file(project, "two.mp3", encode(tone(500, 4.0), 16000, "mp3"), "audio/mpeg")
    for _ in range(2):  # a second "Retrieve predictions" adds none
        label_studio.retrieve_predictions(project)
    version = our_version(asr_server, ASR)
    for task_id in ids:
        prediction = only_prediction(label_studio, task_id, version)
        (item,) = _of(prediction, "textarea")
        assert (item["from_name"], item["to_name"], item["value"]["text"]) == (
            "transcription",
            "audio",
            [TEXT],
        )
        assert_valid_prediction(ASR, prediction, label_studio.task(task_id)["data"])


def _segments_task(label_studio: LabelStudio, server: MLServer, title: str) -> tuple[Project, int, str]:
    project = int(label_studio.create_project(title, SEGMENTS)["id"])
    ml_id = connect(label_studio, server, project)
    (task_id,) = label_studio.import_file(project, "seg.wav", wav_bytes(tone(300, 3.0)), "audio/wav")
    label_studio.retrieve_predictions(project)
    return Project(project, ml_id, SEGMENTS, [task_id]), task_id, our_version(server, SEGMENTS)


def test_asr_using_segments_template(label_studio: LabelStudio, asr_server: MLServer) -> None:
    """One Speech region 0-1.5 s with its text under the same region id, valid for the config."""
    _, task_id, version = _segments_task(label_studio, asr_server, "e2e asr segments")
    prediction = only_prediction(label_studio, task_id, version)
    (region,) = _of(prediction, "labels")
    (text,) = _of(prediction, "textarea")
    assert region["value"] == {"start": 0.0, "end": END_S, "channel": 0, "labels": ["Speech"]}
    assert text["id"] == region["id"] and text["value"]["text"] == [TEXT]
    assert_valid_prediction(SEGMENTS, prediction, label_studio.task(task_id)["data"])


def test_labeling_page_shows_the_segment(
    browser: Chromium, label_studio: LabelStudio, asr_server: MLServer, artifacts_dir: Path
) -> None:
    """The segments task opens with our prediction: its Speech region is listed in the labeling page."""
    project, task_id, version = _segments_task(label_studio, asr_server, "e2e asr segments page")
    only_prediction(label_studio, task_id, version)
    open_task(browser, label_studio, project, task_id)

    def rendered(state: Any) -> bool:
        # the page shortens the version ("audio_tr...8c6305"); the region list names our Speech region
        text = state["text"] if isinstance(state, dict) else ""
        return version[-6:] in text and "Speech" in text.partition("\nRegions\n")[2]

    browser.wait_for(PAGE_STATE, rendered, "our Speech region in the labeling page's region list")
    save_screenshot(browser, artifacts_dir, "labeling-audio-segments", rendered)

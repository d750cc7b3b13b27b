"""Audio classification (Choices) and sound events (Labels) on audio: CLAP zero-shot and a supervised classifier.

A tiny random CLAP and a tiny AST classifier are built by the tests and load through the real loading
code. CLAP's encoders are planted: a window's embedding is the one-hot of the tone it hears (its
loudest mel bin: 440 Hz "dog", 1000 Hz "cat", nothing else "background"), a prompt's the one-hot of
the word it names (any other word: a fourth direction), so logits are exactly scale * cos. The AST's head is zeroed with a planted bias.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient

from backends import _audio_windows as aw
from backends import registry
from backends.audio_classification import AudioClassificationBackend
from backends.audio_transcription import TranscriptionBackend
from serving.cli.weights import _owner
from serving.fetch.audio import Audio
from serving.http.app import create_app
from serving.inference.runtime import Runtime
from serving.plan.planner import build_plan
from serving.settings import Settings
from tests.backends._audio_support import silence, tone
from tests.backends._clap_support import (
    RATE,
    build_clap,
    build_classifier,
    build_diarizer,
    build_nemotron_diarizer,
    plant_clap,
)
from tests.backends._ocr_support import validate

FAMILIES = {"audio_transcription": TranscriptionBackend, "audio_classification": AudioClassificationBackend}
WORDS = ("dog", "cat", "background", "other")
SCALE = 1 / 0.07  # CLAP's initial logit scale (exp(log(1 / 0.07)))
P_HIGH = math.exp(SCALE) / (math.exp(SCALE) + 2)  # cos 1 for one of three prompts, 0 for the others

CLIPS: dict[str, np.ndarray] = {
    "dog.wav": tone(440, 3.0),
    "both.wav": np.concatenate([tone(440, 1.0), tone(1000, 1.0)]),
    # silence 0-3 s, dog 3-6 s, silence 6-8 s, cat 8-10 s
    "events.wav": np.concatenate([silence(3.0), tone(440, 3.0), silence(2.0), tone(1000, 2.0)]),
    # silence 0-2 s, dog 2-5 s, silence 5-8 s
    "short-event.wav": np.concatenate([silence(2.0), tone(440, 3.0), silence(3.0)]),
    # silence 0-1 s, the high voice 1-3 s, the low one 3-5 s (with a 0.1 s breath at 4 s), the high one 5-6 s
    "dialogue.wav": np.concatenate(
        [silence(1.0), tone(1000, 2.0), tone(300, 1.0), silence(0.1), tone(300, 0.9), tone(1000, 1.0)]
    ),
}
SPEAKERS = """<View>
  <Labels name="label" toName="audio" zoom="true" hotkey="ctrl+enter">
    <Label value="Speaker one" background="#00FF00"/>
    <Label value="Speaker two" background="#12ad59"/>
  </Labels>
  <Audio name="audio" value="$audio" />
</View>"""

CHOICES = """<View>
  <Audio name="audio" value="$audio"/>
  <Choices name="kind" toName="audio" %s>
    <Choice value="Dog"/><Choice value="Cat"/><Choice value="Bird"/>
  </Choices>
</View>"""

EVENTS = """<View>
  <Labels name="events" toName="audio" %s>
    <Label value="Dog"/><Label value="Cat"/>
  </Labels>
  <Audio name="audio" value="$audio"/>
</View>"""


class ClipResolver:
    """Serve the generated clips by URL name, as the data resolver would after decoding."""

    def load_audio(self, value: str, task_id: int | None = None, *, sample_rate: int = RATE) -> Audio:
        """Return the clip named by the URL's last path part at 16 kHz."""
        assert sample_rate == RATE
        return Audio(CLIPS[value.rsplit("/", 1)[-1]], RATE)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the tiny CLAP and AST (labels dog, cat, bird; planted logits 2, -1, -3) once."""
    root = tmp_path_factory.mktemp("audio-models")
    return {
        "clap": build_clap(root / "clap"),
        "ast": build_classifier(root / "ast", {0: "dog", 1: "cat", 2: "bird"}, [2.0, -1.0, -3.0]),
        "diarizer": build_diarizer(root / "diarizer"),
    }


@pytest.fixture
def server(models: dict[str, Path], tmp_path: Path) -> Iterator[tuple[FlaskClient, Runtime]]:
    """Build the app over the audio families, CLAP_MODEL pointing at the tiny CLAP."""
    settings = Settings(
        model_dir=str(tmp_path),
        clap_model=str(models["clap"]),
        speaker_model=str(models["diarizer"]),
        max_wait_ms=100.0,
    )
    runtime = Runtime(settings, families=FAMILIES, resolver=ClipResolver())
    app = create_app(settings, runtime=runtime)
    with app.test_client() as client:
        yield client, runtime
    runtime.close()


def _loaded(runtime: Runtime, client: FlaskClient, config: str) -> AudioClassificationBackend:
    response = client.post("/setup", json={"schema": config, "project": "1.1"})
    assert response.status_code == 200, response.get_json()
    (spec,) = runtime.plan(config).specs
    slot = runtime.slot(spec)
    assert slot.ready.wait(60)
    backend = slot.backend
    assert isinstance(backend, AudioClassificationBackend) and backend.model is not None
    return backend


def _predict(client: FlaskClient, config: str, names: list[str]) -> list[list[dict[str, Any]]]:
    tasks = [{"id": i + 1, "data": {"audio": f"http://ls/data/{n}"}} for i, n in enumerate(names)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == len(tasks)
    for result in results:
        assert validate(config, result["result"]) == []
    return [r["result"] for r in results]


def _one_hot(word: str) -> np.ndarray:
    return np.eye(len(WORDS))[WORDS.index(word)]


def _plant(backend: AudioClassificationBackend) -> tuple[list[int], list[int]]:
    """Plant the one-hot encoders; return the audio calls' window counts and the text calls' prompt counts."""
    fe = backend.extractor
    bins = {hz: int(np.argmax(aw.log_mel(tone(hz, 1.0), fe).mean(axis=0))) for hz in (440, 1000)}

    def audio(window: np.ndarray) -> np.ndarray:
        level = window[0].max(axis=0)  # per mel bin, the loudest frame
        if level.max() <= aw.DB_FLOOR + 1:
            return _one_hot("background")
        heard = [hz for hz, b in bins.items() if level[b] >= level.max() - 1.0]
        return sum((_one_hot("dog" if hz == 440 else "cat") for hz in heard), np.zeros(len(WORDS)))

    def text(prompt: str) -> np.ndarray:
        words = [w for w in WORDS if w in prompt.lower()]
        return _one_hot(words[0] if words else "other")

    text_calls: list[int] = []
    calls = plant_clap(backend, audio, text)
    embed_text = backend._embed_text

    def counted(texts: list[str]) -> np.ndarray:
        text_calls.append(len(texts))
        return embed_text(texts)

    backend._embed_text = counted  # type: ignore[method-assign]
    return calls, text_calls


def test_window_spans_cover_the_file_and_end_at_its_end() -> None:
    """2 s windows every 1 s; the last one moved back to end at 9.5 s; a short file is one window."""
    assert aw.window_spans(1.5, 2.0, 1.0) == [(0.0, 1.5)]
    assert aw.window_spans(0.0, 2.0, 1.0) == []
    spans = aw.window_spans(9.5, 2.0, 1.0)
    assert spans[0] == (0.0, 2.0) and spans[-2] == (7.0, 9.0) and spans[-1] == (7.5, 9.5)
    assert aw.window_spans(30.0, 10.0, 10.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]


def test_merge_events_averages_overlapping_windows_into_regions() -> None:
    """A stretch scores the mean of its windows; runs at or above the threshold become one region each."""
    spans = [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0)]
    scores = np.array([[0.0, 0.9], [0.9, 0.9], [0.9, 0.0], [0.9, 0.0]])
    events = aw.merge_events(spans, scores, 0.5)
    assert [(e.label, e.start, e.end) for e in events] == [(1, 0.0, 2.0), (0, 2.0, 5.0)]
    assert events[1].score == pytest.approx(0.9) and events[0].score == pytest.approx((0.9 * 1 + 0.9) / 2)
    assert aw.merge_events(spans, scores, 0.5, min_s=2.5) == [aw.Event(0, 2.0, 5.0, pytest.approx(0.9))]


def test_log_mel_is_the_extractor_s_and_repeat_padding_matches_but_at_seams(models: dict[str, Path]) -> None:
    """One torch log-mel per file equals CLAP's extractor on a 10 s window; a 3 s window differs only at seams."""
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor.from_pretrained(models["clap"])
    clip = tone(440, 10.0) + tone(1000, 10.0, amplitude=0.2)
    reference = fe(clip, sampling_rate=RATE, return_tensors="np")["input_features"][0, 0]
    assert np.abs(aw.log_mel(clip, fe) - reference).max() < 1e-3
    assert np.abs(aw.log_mel(clip, fe, block_frames=77) - reference).max() < 1e-3  # blocks join seamlessly
    short = tone(440, 3.0)
    reference = fe(short, sampling_rate=RATE, return_tensors="np")["input_features"][0, 0]
    mine = aw.clap_window(aw.log_mel(short, fe), 0, 300, 1001)
    off = np.where(np.abs(mine - reference).max(axis=1) > 0.5)[0]
    assert set(off) <= {f + d for f in (300, 600, 900) for d in (-1, 0, 1)}


def test_choices_on_audio_route_to_clap_and_pick_the_planted_choice(
    server: tuple[FlaskClient, Runtime],
) -> None:
    """No model named: CLAP; the 440 Hz clip is "Dog" with the softmax share exp(s) / (exp(s) + 2)."""
    client, runtime = server
    config = CHOICES % ""
    (route,) = runtime.plan(config).routes
    assert (route.family, route.model) == ("audio_classification", "clap")
    backend = _loaded(runtime, client, config)
    audio_calls, text_calls = _plant(backend)
    results = _predict(client, config, ["dog.wav", "dog.wav"])
    for (item,) in results:
        assert item["value"] == {"choices": ["Dog"]}
        assert item["score"] == pytest.approx(P_HIGH, abs=1e-6)
    assert audio_calls == [2]  # both tasks' windows in one encoder call
    _predict(client, config, ["dog.wav"])
    assert text_calls == [3]  # the prompts were embedded once


def test_multiple_choices_take_every_choice_above_the_threshold(server: tuple[FlaskClient, Runtime]) -> None:
    """A clip with both tones: Dog and Cat share the softmax mass (cos 1/sqrt 2 each), Bird gets ~0."""
    client, runtime = server
    config = CHOICES % 'choice="multiple" model_prompt="A recording of a {label}."'
    _plant(_loaded(runtime, client, config))
    ((item,),) = _predict(client, config, ["both.wav"])
    assert item["value"]["choices"] == ["Dog", "Cat"]
    share = math.exp(SCALE / math.sqrt(2)) / (2 * math.exp(SCALE / math.sqrt(2)) + 1)
    assert item["score"] == pytest.approx(share, abs=1e-6)


def test_sound_events_become_labeled_regions_in_seconds(server: tuple[FlaskClient, Runtime]) -> None:
    """2 s windows every 1 s: dog 3-6 s and cat 8-10 s come back exactly, silence gives nothing."""
    client, runtime = server
    config = EVENTS % ""
    (route,) = runtime.plan(config).routes
    assert route.family == "audio_classification"
    _plant(_loaded(runtime, client, config))
    (result,) = _predict(client, config, ["events.wav"])
    found = [(r["value"]["labels"], r["value"]["start"], r["value"]["end"]) for r in result]
    assert found == [(["Dog"], 3.0, 6.0), (["Cat"], 8.0, 10.0)]
    assert all(r["score"] == pytest.approx(P_HIGH, abs=1e-6) for r in result)
    assert all(r["original_length"] == 10.0 and r["type"] == "labels" for r in result)


INTENT = """<View>
  <Labels name="labels" toName="audio" model_background="" model_score_threshold="0.6">
    <Label value="Segment"/>
  </Labels>
  <Audio name="audio" value="$audio"/>
  <Choices name="kind" toName="audio" perRegion="true"><Choice value="Dog"/><Choice value="Cat"/></Choices>
</View>"""


def test_per_region_choices_classify_each_sound_region(server: tuple[FlaskClient, Runtime]) -> None:
    """*Intent classification*'s shape: loud stretches become Segment regions, each region's windows pick its choice."""
    client, runtime = server
    plan = runtime.plan(INTENT)
    assert plan.unfilled == () and [r.control for r in plan.routes] == ["labels"]
    _plant(_loaded(runtime, client, INTENT))
    (result,) = _predict(client, INTENT, ["events.wav"])
    regions = {r["id"]: r for r in result if r["type"] == "labels"}
    choices = {r["id"]: r for r in result if r["type"] == "choices"}
    assert choices.keys() == regions.keys()
    found = sorted(
        (r["value"]["start"], r["value"]["end"], choices[i]["value"]["choices"]) for i, r in regions.items()
    )
    assert found == [(3.0, 6.0, ["Dog"]), (8.0, 10.0, ["Cat"])]
    for i, choice in choices.items():
        assert choice["from_name"] == "kind" and choice["value"]["start"] == regions[i]["value"]["start"]
        assert choice["score"] == pytest.approx(math.exp(SCALE) / (math.exp(SCALE) + 1), abs=1e-6)


def test_a_supervised_classifier_by_model_path_maps_its_labels(
    server: tuple[FlaskClient, Runtime], models: dict[str, Path]
) -> None:
    """AST's id2label (dog, cat, bird) maps onto the config's choices; events use its sigmoid per window."""
    client, _ = server
    config = CHOICES % f'model_path="{models["ast"]}"'
    ((item,),) = _predict(client, config, ["dog.wav"])
    assert item["value"] == {"choices": ["Dog"]}
    assert item["score"] == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(-3)))
    config = EVENTS % f'model_path="{models["ast"]}"'
    (result,) = _predict(client, config, ["short-event.wav"])
    assert [(r["value"]["labels"], r["value"]["start"], r["value"]["end"]) for r in result] == [
        (["Dog"], 2.0, 5.0)
    ]
    assert result[0]["score"] == pytest.approx(1 / (1 + math.exp(-2)))


def test_the_real_random_clap_gives_valid_answers(server: tuple[FlaskClient, Runtime]) -> None:
    """Unplanted, the tiny CLAP's real encoders run end to end; every answer is valid for its config."""
    client, _ = server
    config = CHOICES % 'model_score_threshold="0"'
    ((item,),) = _predict(client, config, ["dog.wav"])
    assert item["value"]["choices"][0] in {"Dog", "Cat", "Bird"}
    _predict(client, EVENTS % 'model_score_threshold="0.3"', ["events.wav"])


def test_routing_between_whisper_clap_and_the_speaker_template(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Labels + per-region TextArea stay Whisper's, its per-region Choices unfilled; missing weights: 422 + command."""
    settings = Settings(model_dir=str(tmp_path), clap_model=str(models["clap"]))
    segments = (
        '<View><Labels name="l" toName="a"><Label value="Speech"/></Labels><Audio name="a" value="$a"/>'
        '<TextArea name="t" toName="a" perRegion="true"/></View>'
    )
    (target,) = build_plan(segments, settings, FAMILIES).targets
    assert target.model.family == "audio_transcription"
    per_region = segments.replace(
        "</View>", '<Choices name="c" toName="a" perRegion="true"><Choice value="Yes"/></Choices></View>'
    )
    plan = build_plan(per_region, settings, FAMILIES)
    assert [t.model.family for t in plan.targets] == ["audio_transcription"] and plan.unfilled == (
        "c (Choices)",
    )
    (target,) = build_plan(SPEAKERS, settings, FAMILIES).targets
    assert target.model.name == "speaker_segmentation"
    missing = settings.with_(clap_model="laion/no-such-clap", speaker_model="nvidia/no-such-diarizer")
    runtime = Runtime(missing, families=FAMILIES, resolver=ClipResolver())
    with create_app(missing, runtime=runtime).test_client() as client:
        response = client.post("/setup", json={"schema": CHOICES % "", "project": "1.1"})
        assert response.status_code == 422
        assert "python -m serving weights download --model clap" in response.get_json()["message"]
        response = client.post("/setup", json={"schema": SPEAKERS, "project": "1.1"})
        assert response.status_code == 422  # SPEAKER_MODEL (Nemotron 3 Diarization) is not cached
        assert (
            "python -m serving weights download --model speaker_segmentation"
            in response.get_json()["message"]
        )
    runtime.close()
    families = registry()
    assert _owner("clap", families) == _owner("speaker_segmentation", families) == "audio_classification"


def test_frame_runs_join_short_pauses_and_score_their_frames() -> None:
    """Frames at or above 0.5 make runs; a 1-frame gap is bridged with min_gap_s, a 3-frame one is not."""
    probs = np.array([[0.9], [0.7], [0.1], [0.9], [0.1], [0.1], [0.1], [0.6]])
    assert aw.frame_runs(probs, 0.5, 0.5) == [
        aw.Event(0, 0.0, 1.0, pytest.approx(0.8)),
        aw.Event(0, 1.5, 2.0, pytest.approx(0.9)),
        aw.Event(0, 3.5, 4.0, pytest.approx(0.6)),
    ]
    joined = aw.frame_runs(probs, 0.5, 0.5, min_gap_s=0.5)
    assert [(e.start, e.end) for e in joined] == [(0.0, 2.0), (3.5, 4.0)]
    assert joined[0].score == pytest.approx((0.9 + 0.7 + 0.9) / 3)


def test_speaker_segmentation_gives_turns_in_order_of_first_speech(
    server: tuple[FlaskClient, Runtime],
) -> None:
    """LS's *Speaker segmentation* template: the diarizer's speaker 1 talks first, so it is "Speaker one"."""
    client, runtime = server
    backend = _loaded(runtime, client, SPEAKERS)
    assert backend.kind == "frames"
    real = backend._frame_probs(CLIPS["dialogue.wav"])
    assert real.shape == (299, 2)  # the real random WavLM: 20 ms frames over the 6 s

    def planted(samples: np.ndarray) -> np.ndarray:
        """Speaker 0 is the 300 Hz voice, speaker 1 the 1000 Hz one (peak of each 20 ms frame)."""
        frames = samples[: len(samples) // 320 * 320].reshape(-1, 320)
        peak_hz = np.abs(np.fft.rfft(frames, axis=1)).argmax(axis=1) * RATE / 320
        loud = np.abs(frames).max(axis=1) > 0.01
        return np.stack([loud & (peak_hz < 600), loud & (peak_hz >= 600)], axis=1) * 0.8 + 0.1

    backend._frame_probs = planted  # type: ignore[method-assign]
    (result,) = _predict(client, SPEAKERS, ["dialogue.wav"])
    found = [(r["value"]["labels"], r["value"]["start"], r["value"]["end"]) for r in result]
    assert found == [(["Speaker one"], 1.0, 3.0), (["Speaker two"], 3.0, 5.0), (["Speaker one"], 5.0, 6.0)]
    assert all(r["score"] == pytest.approx(0.9) for r in result)


def test_the_default_diarizer_architecture_loads_and_answers(tmp_path: Path) -> None:
    """A tiny random Nemotron 3 Diarization (SPEAKER_MODEL's architecture) loads with its processor: 10 ms frames."""
    from serving.contract import ModelSpec

    settings = Settings(
        model_dir=str(tmp_path), speaker_model=str(build_nemotron_diarizer(tmp_path / "nemotron"))
    )
    spec = ModelSpec("audio_classification", "speaker_segmentation")
    assert AudioClassificationBackend.availability(spec, settings) is None
    backend = AudioClassificationBackend(spec, settings)
    backend.load("cpu")
    assert backend.audio_rate() == RATE
    probs = backend._frame_probs(CLIPS["dialogue.wav"])
    assert probs.shape == (601, 8) and ((probs >= 0) & (probs <= 1)).all()

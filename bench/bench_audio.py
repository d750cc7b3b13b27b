"""Benchmark transcription: audio seconds transcribed per second, /predict vs raw Whisper batched vs a per-file loop.

CPU run here (no hub: a tiny Whisper built by the tests' helper, planted to write one short segment per
30 s chunk, so every way decodes the same tokens):
    python -m bench.bench_audio --out bench/results/audio.json
A real checkpoint where its weights are cached (GPU host):
    python -m bench.bench_audio --model openai/whisper-large-v3-turbo --device cuda --files 64

Rows (audio seconds per second, the same --files clips of --seconds each, measured one after another):
- raw_batched: what a transformers user writes for batched long-form audio: the processor's log-mel of
  every 30 s chunk of every file (5 s overlap), then model.generate(return_timestamps=True) over
  batches of --chunk-batch chunks.
- raw_per_file: the same, one file's chunks per generate() call.
- backend_per_task: TranscriptionBackend.forward([one task]) per file (detection, generate, scoring pass,
  stitching), like a server that runs one task at a time.
- predict_app: POST /predict with every file as one task in one request through create_app's test
  client (planning, decode pool, batcher across tasks, stitching, validation, JSON), after a warm-up.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.audio_transcription import TranscriptionBackend, chunk_spans
from bench._common import write_report
from serving.contract import Item, ModelSpec, ObjectTag
from serving.fetch.audio import Audio
from serving.settings import Settings

log = logging.getLogger("bench_audio")
RATE = 16000
CONFIG = """<View>
  <Audio name="audio" value="$audio"/>
  <TextArea name="transcription" toName="audio" model_language="en"/>
</View>"""


def make_clips(files: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    """Return `files` clips of tones and noise (speech-like loudness changes), 16 kHz mono float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * RATE)) / RATE
    clips = []
    for _ in range(files):
        freq = float(rng.uniform(150, 400))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * float(rng.uniform(0.5, 3.0)) * t)
        noise = rng.normal(0, 0.05, t.shape)
        clips.append((0.3 * envelope * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32))
    return clips


class ClipResolver:
    """Serve the clips by index in the URL, as the resolver would after decoding."""

    def __init__(self, clips: list[np.ndarray]) -> None:
        self.clips = clips

    def load_audio(self, value: str, task_id: int | None = None, *, sample_rate: int = RATE) -> Audio:
        """Return clip <i> of a URL ending in clip-<i>.wav."""
        return Audio(self.clips[int(value.rsplit("-", 1)[-1].split(".")[0])], RATE)


def timed(fn: Callable[[], Any], device: str) -> float:
    """Return the wall time of one call, GPU work included."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def raw_transcribe(backend: TranscriptionBackend, clips: list[np.ndarray], chunk_batch: int) -> int:
    """Transcribe clips the plain transformers way: processor log-mel per chunk, batched generate; return chunks."""
    import torch

    pieces = []
    for clip in clips:
        for start, length in chunk_spans(len(clip) / RATE, 30.0, 5.0):
            pieces.append(clip[round(start * RATE) : round((start + length) * RATE)])
    model, processor = backend.model, backend.processor
    for i in range(0, len(pieces), chunk_batch):
        feats = processor.feature_extractor(
            pieces[i : i + chunk_batch], sampling_rate=RATE, return_tensors="pt"
        )
        x = feats["input_features"].to(backend.device, dtype=backend.dtype)
        with torch.inference_mode():
            model.generate(input_features=x, language="en", task="transcribe", return_timestamps=True)
    return len(pieces)


def backend_per_task(backend: TranscriptionBackend, clips: list[np.ndarray], target: Any) -> None:
    """Run the backend one task at a time (preprocess + forward), under inference_mode like the runtime."""
    import torch

    obj = ObjectTag("audio", "Audio", "audio")
    with torch.inference_mode():
        for clip in clips:
            item = Item(task={}, obj=obj, audio=clip, sample_rate=RATE, targets=[target])
            backend.forward([backend.preprocess(item)])


def _tiny_model(root: Path) -> str:
    from tests.backends._whisper_support import build_whisper, plant_transcript

    return str(plant_transcript(build_whisper(root / "whisper", d_model=32, tied=False), "Hi, Bob.", 1.5))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print audio seconds per second and ratios, write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each clip")
    parser.add_argument("--model", default="", help="a Whisper id or folder (default: the planted tiny one)")
    parser.add_argument("--device", default="", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--chunk-batch", type=int, default=TranscriptionBackend.chunk_batch)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    model = args.model or _tiny_model(tmp)
    settings = Settings(model_dir=str(tmp), device=device, whisper_model=model, max_wait_ms=5.0)
    clips = make_clips(args.files, args.seconds)
    audio_s = args.files * args.seconds
    backend = TranscriptionBackend(ModelSpec("audio_transcription", "whisper"), settings)
    backend.load(device)

    from serving.http.app import create_app
    from serving.inference.runtime import Runtime

    runtime = Runtime(
        settings, families={"audio_transcription": TranscriptionBackend}, resolver=ClipResolver(clips)
    )
    client = create_app(settings, runtime=runtime).test_client()
    target = runtime.plan(CONFIG).targets[0]
    tasks = [{"id": i + 1, "data": {"audio": f"/data/upload/1/clip-{i}.wav"}} for i in range(args.files)]

    def predict(n: int) -> None:
        body = {"tasks": tasks[:n], "label_config": CONFIG}
        response = client.post("/predict", json=body)
        assert response.status_code == 200 and all(r["result"] for r in response.get_json()["results"])

    predict(1)  # warm-up: plans the config, loads the model once
    raw_transcribe(backend, clips[:1], args.chunk_batch)
    rows = {
        "raw_batched": audio_s / timed(lambda: raw_transcribe(backend, clips, args.chunk_batch), device),
        "raw_per_file": audio_s
        / timed(lambda: [raw_transcribe(backend, [c], args.chunk_batch) for c in clips], device),
        "backend_per_task": audio_s / timed(lambda: backend_per_task(backend, clips, target), device),
        "predict_app": audio_s / timed(lambda: predict(len(tasks)), device),
    }
    runtime.close()
    ratios = {
        "predict_app / raw_batched": rows["predict_app"] / rows["raw_batched"],
        "predict_app / raw_per_file": rows["predict_app"] / rows["raw_per_file"],
        "predict_app / backend_per_task": rows["predict_app"] / rows["backend_per_task"],
    }
    for name, rate in rows.items():
        log.info("%-20s %10.1f audio s/s", name, rate)
    for name, ratio in ratios.items():
        log.info("%-32s %6.2fx", name, ratio)
    write_report(
        args.out,
        {
            "model": model if args.model else "tiny planted Whisper (d_model 32, 1+1 layers)",
            "device": device,
            "gpu": torch.cuda.get_device_name(0)
            if device.startswith("cuda")
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "files": args.files,
            "seconds_each": args.seconds,
            "chunks": sum(len(chunk_spans(len(c) / RATE, 30.0, 5.0)) for c in clips),
            "chunk_batch": args.chunk_batch,
            "audio_seconds_per_s": rows,
            "ratios": ratios,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Video tracking: frames/s through /predict vs the raw detector batched vs a frame-by-frame loop, decode apart.

Run (CPU, small): `python -m bench.bench_video --seconds 10`; on a GPU box raise --seconds / --size.
One process, one machine, the same generated clip (moving squares, known fps) for every row:
- decode: the one video decoder alone (serving/fetch/video.py), the frames VIDEO_SAMPLE_FPS samples;
- raw batched: the detector family's forward() on the preprocessed sampled frames, `--batch` per call
  (the runtime's only model step; fp16 autocast on CUDA like the runtime);
- frame loop: the same forward() one frame per call (what a per-frame loop over a video costs);
- /predict: one POST /predict with the video task (data: URI) through the composition root
  (model.create_app): download, decode, the detector's preprocess, batched forward, ByteTrack, regions,
  validation.
No weights exist offline: the detector is torchvision's architecture at its real size with random
weights whose classifier is planted (bench_vision.fill_random_weights) so every frame has boxes to track.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import write_report

log = logging.getLogger("bench_video")

CONFIG = """<View>
  <Labels name="labels" toName="video"><Label value="person"/><Label value="car"/></Labels>
  <Video name="video" value="$video" framerate="%d"/>
  <VideoRectangle name="box" toName="video" model_name="detection:%s" model_score_threshold="%s"/>
</View>"""


def make_video(seconds: float, fps: int, size: tuple[int, int]) -> bytes:
    """Return an H.264 mp4 of moving squares."""
    from tests.support.video import Shape, make_clip, moving

    width, height = size
    shapes = [
        Shape(
            (230, 30, 30), 0, 10**6, moving(0, height // 4, width // 8, width // 8, width / (fps * seconds))
        ),
        Shape((30, 30, 230), 0, 10**6, moving(width - width // 8, height // 2, width // 8, width // 8, -2.0)),
    ]
    return make_clip(shapes, int(seconds * fps), fps=fps, size=size)


def time_decode(body: bytes, sample_fps: float, repeat: int = 3) -> tuple[float, Any]:
    """Return (sampled frames/s of decoding, the decoded video)."""
    from serving.fetch.cache import Fetched
    from serving.fetch.video import Sampling, decode_video

    best = float("inf")
    video = None
    for _ in range(repeat):
        start = time.perf_counter()
        video = decode_video(Fetched(body, "video/mp4", None, "bench.mp4"), Sampling(fps=sample_fps))
        best = min(best, time.perf_counter() - start)
    assert video is not None
    return len(video.frames) / best, video


def time_forward(model: str, frames: list[Any], batch: int, device: str) -> dict[str, float]:
    """Return frames/s of the detector's forward: batched and one frame per call."""
    import torch

    from backends.detection import DetectionBackend
    from serving.contract import Item, ModelSpec, ObjectTag
    from serving.settings import Settings

    backend = DetectionBackend(ModelSpec("detection", model), Settings(max_detections=20))
    backend.load(device)
    obj = ObjectTag("video", "Image", "video")
    inputs = [backend.preprocess(Item(task={}, obj=obj, image=f)) for f in frames]
    fp16 = device.startswith("cuda")
    out = {}
    for name, step in (("raw_batched", batch), ("frame_loop", 1)):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
            backend.forward(inputs[:step])  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(0, len(inputs), step):
                backend.forward(inputs[i : i + step])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        out[name] = len(inputs) / (time.perf_counter() - start)
    return out


def time_predict(model: str, body: bytes, fps: int, sample_fps: float, batch: int) -> tuple[float, int, int]:
    """Return (sampled frames/s of one POST /predict with the video, frames sampled, tracks returned)."""
    from model import create_app
    from serving.settings import Settings

    settings = Settings(
        model_dir=tempfile.mkdtemp(),
        max_batch_size=batch,
        max_detections=20,
        video_sample_fps=sample_fps,
        cache_max_bytes=0,
    )
    app = create_app(settings)
    from bench.bench_vision import PLANTED_THRESHOLD

    config = CONFIG % (fps, model, PLANTED_THRESHOLD)
    task = {"id": 1, "data": {"video": "data:video/mp4;base64," + base64.b64encode(body).decode()}}
    client = app.test_client()
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 200, setup.get_json()
    client.post("/predict", json={"tasks": [task], "label_config": config})  # load + warm-up
    start = time.perf_counter()
    resp = client.post("/predict", json={"tasks": [task], "label_config": config})
    elapsed = time.perf_counter() - start
    body_json = resp.get_json()
    assert resp.status_code == 200, body_json
    (result,) = body_json["results"]
    sampled = max((len(r["value"]["sequence"]) for r in result["result"]), default=0)
    app.extensions["lsml_model"].runtime.close()
    return elapsed, sampled, len(result["result"])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the four rates and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--sample-fps", type=float, default=5.0)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="", help="default: cuda when available")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from bench.bench_vision import fill_random_weights

    home = Path(tempfile.mkdtemp())
    os.environ["TORCH_HOME"] = str(home)  # the benchmark is a program of its own, like the CLI
    fill_random_weights(args.model, home, plant=True)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    width, height = (int(v) for v in args.size.split("x"))
    body = make_video(args.seconds, args.fps, (width, height))
    decode_fps, video = time_decode(body, args.sample_fps)
    frames = list(video.frames)
    log.info(
        "%s on %s: %.0f s clip %dx%d @ %d fps, %d frames sampled",
        args.model,
        device,
        args.seconds,
        width,
        height,
        args.fps,
        len(frames),
    )
    forward = time_forward(args.model, frames, args.batch, device)
    elapsed, sampled, tracks = time_predict(args.model, body, args.fps, args.sample_fps, args.batch)
    predict_fps = len(frames) / elapsed
    report = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "clip": {"seconds": args.seconds, "fps": args.fps, "size": args.size, "frames_sampled": len(frames)},
        "frames_per_s": {"decode": decode_fps, **forward, "predict": predict_fps},
        "predict_s": elapsed,
        "tracks": tracks,
        "ratios": {
            "predict_over_raw_batched": predict_fps / forward["raw_batched"],
            "raw_batched_over_frame_loop": forward["raw_batched"] / forward["frame_loop"],
            "decode_share_of_predict": (len(frames) / decode_fps) / elapsed,
        },
    }
    for key, value in report["frames_per_s"].items():
        log.info("%-12s %8.1f frames/s", key, value)
    log.info("ratios: %s", {k: round(v, 3) for k, v in report["ratios"].items()})
    log.info("tracks returned: %d (longest: %d keyframes)", tracks, sampled)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

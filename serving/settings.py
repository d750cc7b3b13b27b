"""Settings.from_env(): the only module of the project that reads os.environ (and torch's cache variables)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Settings:
    """Every knob of the server, with safe defaults; built once by from_env()."""

    # Label Studio connection (names kept from Label Studio's own backends).
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    local_files_document_root: str = ""
    # Where jobs, caches and user checkpoints live.
    model_dir: str = "./model_dir"
    # Basic auth on every route but /health (and /webhook, see README).
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    log_level: str = "INFO"
    host: str = "127.0.0.1"
    port: int = 9090
    workers: int = 1
    threads: int = 8
    # Runtime.
    device: str = ""  # "" = cuda when available, else cpu
    fp16: bool = True
    warmup: tuple[str, ...] = ()  # model keys to load at start, e.g. "ner:spacy"
    max_batch_size: int = 0  # 0 = the backend's own policy
    max_wait_ms: float = 5.0
    max_detections: int = 0  # boxes per image for detectors; 0 = the family's own cap (100)
    queue_size: int = 1024
    preprocess_threads: int = 8
    model_version: str = ""  # deployment override
    load_wait_s: float = 60.0  # how long /predict waits for a model still loading
    predict_timeout_s: float = 95.0  # under Label Studio's own 100 s ML_TIMEOUT_PREDICT
    webhook_secret: str = ""  # when set, /webhook requires ?secret=<value> (LS webhooks carry no auth)
    # Engine defaults per family when a tag names none.
    ner_engine: str = ""  # "" = transformers when its weights are present, else spacy
    ocr_engine: str = "easyocr"
    ocr_languages: tuple[str, ...] = ("en",)
    ocr_shape: str = ""  # "polygon" to prefer polygons when a config has both
    ocr_threads: int = 0  # Tesseract pages in parallel; 0 = min(4, cpu count)
    tessdata_dir: str = ""  # extra place to look for Tesseract language data
    easyocr_model_dir: str = ""  # extra place to look for EasyOCR weights
    sam_model: str = ""  # "" = facebook/sam2.1-hiera-tiny; a SAM / SAM 2 id or a save_pretrained() folder
    # Rectangle tags that name no model: "" = torchvision's detector; an open-vocabulary model name
    # (grounding_dino, owlv2, ...) or a torchvision detector name makes that the default.
    detector: str = ""
    text_threshold: float = 0.25  # Grounding DINO: every token of a label's phrase must score this
    # Generation (backends/generation.py): TextArea / Choices from a language or vision-language model.
    llm_text_model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # a Hugging Face id or a save_pretrained() folder
    llm_vision_model: str = "Qwen/Qwen3-VL-2B-Instruct"
    llm_base_url: str = ""  # an OpenAI-compatible server (".../v1"); tags naming no model then use it
    llm_api_key: str = ""
    llm_model: str = ""  # the model name the server knows
    llm_system_prompt: str = ""  # "" = the family's default (reply with the text only)
    llm_max_new_tokens: int = 256  # per TextArea unless its model_max_tokens says otherwise
    llm_task_timeout_s: float = 60.0  # one generate batch (in process) or one request (server)
    llm_concurrency: int = 8  # requests in flight to the server, per process
    llm_retries: int = 3  # on 429, 5xx, timeouts and connection errors
    llm_image_max_pixels: int = 1024 * 1024  # images are shrunk to this many pixels before the model
    # Audio transcription (backends/audio_transcription.py): the checkpoint "whisper" names. Turbo is
    # large-v3 with 4 decoder layers: multilingual, near large-v3's accuracy, several times faster to decode.
    whisper_model: str = "openai/whisper-large-v3-turbo"
    # Audio classification and sound events (backends/audio_classification.py): the checkpoint "clap"
    # names. LAION's later CLAP, trained on general audio, music and speech (the audio templates need all three).
    clap_model: str = "laion/larger_clap_general"
    sound_event_window_s: float = 2.0  # Labels on audio: each window scored on its own...
    sound_event_hop_s: float = 1.0  # ...every this many seconds (regions snap to hop boundaries)
    # Speaker segmentation (Labels whose labels name speakers): an audio frame classification checkpoint.
    # NVIDIA's Nemotron 3 Diarization: 8 speakers, 10 ms frames, transformers-native, not gated (pyannote is).
    speaker_model: str = "nvidia/Nemotron-3-Diarization"
    # Label routing (own-labels, serving/plan/routing.py): labels no closed-vocabulary model knows go
    # to a zero-shot model prompted by them; false = every tag keeps the family that claims its tag.
    auto_route: bool = True
    # Zero-shot image classification (own-labels): a SigLIP / SigLIP 2 id or save_pretrained() folder.
    zero_shot_image_model: str = ""  # "" = google/siglip2-base-patch16-224
    # Text classification (Choices / Taxonomy on text): an NLI zero-shot or sequence-classification id or folder.
    text_classification_model: str = ""  # "" = MoritzLaurer/deberta-v3-base-zeroshot-v2.0
    # Zero-shot NER (own-labels): a GLiNER hub id or save_pretrained() folder.
    zero_shot_ner_model: str = ""  # "" = urchade/gliner_multi-v2.1
    # Extractive QA (own-labels): a question-answering hub id or save_pretrained() folder.
    qa_model: str = ""  # "" = deepset/roberta-base-squad2
    # Limits (safe defaults, all overridable).
    max_request_bytes: int = 64 * 1024 * 1024
    max_tasks_per_request: int = 5000
    max_download_bytes: int = 50 * 1024 * 1024
    download_timeout_s: float = 15.0
    max_image_pixels: int = 100_000_000
    max_text_chars: int = 2_000_000
    # Audio families: longer audio is refused while decoding (an hour of 16 kHz mono float32 is 230 MB).
    max_audio_seconds: float = 3600.0
    # Video families (serving/fetch/video.py): frames sampled per second (0 = every frame), at most
    # VIDEO_MAX_FRAMES per video (the stride widens to cover the whole clip), shrunk to VIDEO_FRAME_MAX_SIDE:
    # the frames of one video held at once stay under 300 x 1024 x 576 x 3 bytes = 530 MB by default.
    video_sample_fps: float = 5.0
    video_max_frames: int = 300
    video_frame_max_side: int = 1024
    max_video_seconds: float = 3600.0
    # Video tracking (backends/video_tracking.py): a track unseen this long ends (ByteTrack's buffer).
    video_track_buffer_s: float = 1.0
    # Interactive tracking (SAM 2 video, the SAM_MODEL checkpoint): frames a drawn box is tracked forward.
    video_track_frames: int = 60
    # TimelineLabels on Video (backends/video_classification.py): per-frame scores smoothed over this long.
    video_timeline_smooth_s: float = 1.0
    cache_max_bytes: int = 512 * 1024 * 1024
    # Image embeddings of promptable models (SAM), per process, on the model's device: a SAM 2 image
    # is ~16 MB in fp32 (~8 MB fp16), so the default keeps about 32 images (64 in fp16).
    embedding_cache_bytes: int = 512 * 1024 * 1024
    # GPU memory budget for the loaded models' weights (serving/inference/residency.py): least recently
    # used idle models are offloaded to CPU memory to stay under it. GPU_MEMORY_BYTES wins when set (and
    # applies on any device); else GPU_MEMORY_FRACTION of a CUDA device's memory (0 turns it off). The
    # rest of the device is left for activations, embeddings and the CUDA context.
    gpu_memory_fraction: float = 0.8
    gpu_memory_bytes: int = 0
    # How long a request waits for models in use to leave room on the device before its 503.
    memory_wait_s: float = 5.0
    # URL fetching policy.
    allowed_hosts: tuple[str, ...] = ()  # empty = any host except the blocked ones
    allow_private_urls: bool = True  # LS itself usually lives on a private address
    # Batch jobs: server-side inputs must live under this root.
    batch_input_root: str = ""
    job_chunk_size: int = 32  # tasks per committed chunk of a batch job
    # Training on the project's annotations (serving/training/).
    training: bool = True  # False: /webhook only acknowledges events, as before training existed
    # Webhook actions that ask for a training job (coalesced per project and model). Label Studio
    # sends START_TRAINING for "Start Training" and, when the project trains on submission, on each
    # save; it sends every other project event too (it registers /webhook when the model connects),
    # so ANNOTATION_CREATED etc. train only when listed here.
    train_events: tuple[str, ...] = ("START_TRAINING",)
    # A queued job starts this long after the last request that joined it (a burst of saves is one job).
    train_debounce_s: float = 5.0
    train_min_examples: int = 10  # fewer annotated tasks: the job ends "skipped", no new version
    train_epochs: int = 0  # 0 = the family's own default
    train_learning_rate: float = 0.0  # 0 = the family's own default (transformers 5e-5, torchvision 0.005)
    train_keep_versions: int = 5  # trained versions kept per project and model (the active one always)
    train_device: str = ""  # "" = DEVICE, else cuda when available, else cpu
    train_allow_cpu: bool = False  # detection trains on CPU only when true (slow)
    train_idle_s: float = 60.0  # the trainer process exits after this long without a queued job
    job_rescan_s: float = 30.0  # how often a server looks for jobs a stopped or dead replica left
    # Ray batch engine (optional: requirements-ray.txt). RAY_ADDRESS is also Ray's own variable.
    ray_address: str = ""  # "auto", "ray://head:10001", "head:6379"; enables POST /batch "engine": "ray"
    ray_actors: int = 0  # predictor actors; 0 = one per GPU of the cluster (1 without GPUs)
    ray_gpus_per_actor: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0
    ray_cpus_per_actor: float = 1.0
    ray_batch_size: int = 0  # tasks per actor call; 0 = the job's chunk size
    ray_stall_timeout_s: float = 1800.0  # fail a Ray job when no task finishes for this long
    ray_stage_dir: str = ""  # shared folder for the tasks handed to Ray; "" = beside the job's store
    # Replicas: a /predict of more than SPLIT_MIN_TASKS tasks is split over REPLICA_URLS.
    replica_urls: tuple[str, ...] = ()  # the nginx in front of the replicas, or each replica's URL
    split_min_tasks: int = 16
    split_ways: int = 0  # chunks a big request is cut into; 0 = one per REPLICA_URLS entry
    # Admission (serving-path, issue #32): a request finding a model's queue full waits for room
    # within its deadline; these requests and interactive calls go ahead of bigger ones.
    small_request_tasks: int = 8
    max_waiting_items: int = 0  # items waiting for room per model; beyond: 503. 0 = 64 x QUEUE_SIZE
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        """Return MODEL_DIR as a Path."""
        return Path(self.model_dir)

    def with_(self, **changes: Any) -> Settings:
        """Return a copy with some fields changed (tests and app factories)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment (Label Studio's variable names)."""
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            key = f.name.upper()
            if key not in env:
                continue
            raw = env[key]
            default = f.default
            if isinstance(default, bool):
                kwargs[f.name] = _bool(raw)
            elif isinstance(default, int):
                kwargs[f.name] = int(raw)
            elif isinstance(default, float):
                kwargs[f.name] = float(raw)
            elif isinstance(default, tuple):
                kwargs[f.name] = _list(raw)
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)

    def redacted(self) -> dict[str, Any]:
        """Return the settings as a dict with secrets masked, safe to log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in {"label_studio_api_key", "basic_auth_pass", "llm_api_key"} and value:
                value = "***"
            out[f.name] = value
        return out


def torch_checkpoints_dir(env: Mapping[str, str] | None = None) -> Path:
    """Return torch's hub checkpoint folder as torch.hub.get_dir() finds it, without importing torch.

    TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch: torch's own variables, read when
    asked (torch reads them itself when it loads), so that /setup and /health need not import torch.
    """
    env = os.environ if env is None else env
    home = env.get("TORCH_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"

"""The contract every model family implements, and the planning types it receives.

It lives in serving/ so that dependencies point one way: backends/ implement it and import
serving/; serving/ never imports backends/ (the composition root, model.py, hands the registry
in). A backend never reads the environment, never sees Flask and never talks to Label Studio:
it gets decoded items, runs its model, and turns outputs into Label Studio result items
through serving/results/regions.py.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from serving.settings import Settings
    from serving.util.embeddings import EmbeddingCache


@dataclass(frozen=True)
class ControlTag:
    """One control tag of the labeling config (RectangleLabels, Labels, TextArea, ...)."""

    name: str
    tag: str
    to_name: str
    labels: tuple[str, ...] = ()
    attrs: Mapping[str, str] = field(default_factory=dict)
    # config label -> model labels listed in its predicted_values attribute
    predicted_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # config label -> its <Label value>, for labels named by an alias (Label Studio stores the alias)
    label_values: Mapping[str, str] = field(default_factory=dict)
    # Taxonomy: every node as its path from the root (alias or value per node, as Label Studio stores them)
    paths: tuple[tuple[str, ...], ...] = ()

    def attr(self, key: str, default: str = "") -> str:
        """Return a tag attribute, looked up case-insensitively."""
        lowered = {k.lower(): v for k, v in self.attrs.items()}
        return lowered.get(key.lower(), default)


@dataclass(frozen=True)
class ObjectTag:
    """One object tag (Image, Text, ...) and the task data key it reads."""

    name: str
    tag: str
    value_key: str
    attrs: Mapping[str, str] = field(default_factory=dict)
    # (name, tag, value_key) of the config's other object tags: what a family reads beside this one
    # (a QA passage's question Text)
    others: tuple[tuple[str, str, str], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class ModelSpec:
    """Which model of a family: the unit that is loaded once and owns one batcher."""

    family: str
    name: str
    path: str = ""
    # Set on a model trained on a project's annotations: its version id (path is then its folder
    # under MODEL_DIR/versions); model_version names it by this, not by where MODEL_DIR is mounted.
    trained: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        """Return the stable key used in /health, metrics and the runtime."""
        return f"{self.family}:{self.name}" + (f"@{self.path}" if self.path else "")


class LabelMap:
    """Map model labels to config labels; labels that map to nothing are never emitted."""

    def __init__(
        self,
        config_labels: Sequence[str],
        predicted_values: Mapping[str, Sequence[str]] | None = None,
        aliases: Sequence[Collection[str]] = (),
    ) -> None:
        self.config_labels = tuple(config_labels)
        self._predicted: dict[str, str] = {}
        for config_label, model_labels in (predicted_values or {}).items():
            for model_label in model_labels:
                self._predicted.setdefault(model_label, config_label)
        self._exact = set(self.config_labels)
        self._ci: dict[str, str] = {}
        for label in self.config_labels:
            self._ci.setdefault(label.casefold(), label)
        self._aliases = [frozenset(a.casefold() for a in group) for group in aliases]
        self._cache: dict[str, str | None] = {}

    def __call__(self, model_label: str) -> str | None:
        """Return the config label for a model label, or None when it maps to nothing."""
        if model_label in self._cache:
            return self._cache[model_label]
        result = self._resolve(model_label)
        self._cache[model_label] = result
        return result

    def _resolve(self, model_label: str) -> str | None:
        if model_label in self._predicted:
            return self._predicted[model_label]
        if model_label in self._exact:
            return model_label
        folded = model_label.casefold()
        if folded in self._ci:
            return self._ci[folded]
        for group in self._aliases:
            if folded in group:
                for alias in group:
                    if alias in self._ci:
                        return self._ci[alias]
        return None

    @property
    def explicit(self) -> bool:
        """Return True when the config used predicted_values (only those labels are emitted then)."""
        return bool(self._predicted)


@dataclass(frozen=True)
class Target:
    """What one control tag needs from a backend: the control, its object, labels and knobs."""

    control: ControlTag
    obj: ObjectTag
    model: ModelSpec
    label_map: LabelMap
    threshold: float = 0.5
    # Linked controls on the same object whose items share the geometry's region id:
    # "labels" (a sibling Labels tag) and "textarea" (a per-region TextArea), by role.
    linked: Mapping[str, ControlTag] = field(default_factory=dict)
    readonly: bool = False
    hidden: bool = False

    def option(self, key: str, default: str = "") -> str:
        """Return a per-tag knob from the control's attributes."""
        return self.control.attr(key, default)


@dataclass
class Item:
    """One task's input for one object tag, resolved and decoded on the CPU."""

    task: Mapping[str, Any]
    obj: ObjectTag
    image: Image.Image | None = None
    text: str | None = None
    # Structured task data for objects that are not a string (Paragraphs: the list of paragraph objects).
    value: Any = None
    context: Mapping[str, Any] | None = None
    # Set when the image was decoded smaller than it is (see Backend.input_scale): the size LS shows.
    original_size: tuple[int, int] | None = None
    # The targets this item is predicted for (its group's control tags), for backends whose input
    # depends on them (e.g. which drawn regions are prompts).
    targets: Sequence[Target] = ()
    # Audio objects (input_kind "audio"): mono float32 samples at sample_rate Hz (Backend.audio_rate()).
    audio: np.ndarray | None = None
    sample_rate: int = 0
    # Video objects (input_kind "video"): the sampled frames (RGB), their 0-based indices in the stream,
    # the stream's frame rate, frame count and length in seconds, and its (width, height).
    frames: Sequence[Image.Image] = ()
    frame_indices: Sequence[int] = ()
    fps: float = 0.0
    frame_count: int = 0
    video_duration: float = 0.0
    video_size: tuple[int, int] | None = None

    @property
    def duration(self) -> float:
        """Return the audio's (or the video's) length in seconds (0 without either)."""
        if self.audio is None or self.sample_rate <= 0:
            return self.video_duration
        return float(self.audio.shape[0]) / float(self.sample_rate)

    @property
    def task_id(self) -> Any:
        """Return the Label Studio task id (None for bare data)."""
        return self.task.get("id")

    @property
    def size(self) -> tuple[int, int]:
        """Return (width, height) of the image as Label Studio shows it (EXIF applied)."""
        if self.original_size is not None:
            return self.original_size
        if self.image is None:
            raise ValueError("item has no image")
        return self.image.size


@dataclass(frozen=True)
class Claim:
    """A backend's claim on a control tag during planning."""

    control: ControlTag
    model_name: str
    model_path: str = ""
    linked: Mapping[str, ControlTag] = field(default_factory=dict)


# Bytes read from each of a large file's start, middle and end: enough to tell two checkpoints apart
# (training changes every tensor), cheap enough for every /setup (a 2.5 GB file costs three reads).
_SAMPLE_BYTES = 1 << 20
_fingerprints: dict[tuple[str, int, int, int, int], str] = {}
_fingerprints_lock = threading.Lock()


def weights_fingerprint(path: str | Path) -> str:
    """Return a short fingerprint of a weights file's content (or a folder's files), "missing" when absent.

    Content, not name or mtime: two replicas that downloaded the same weights at different times, or
    a restarted server, give the same fingerprint; replacing a checkpoint changes it. Files up to 3 MiB
    are hashed whole; larger ones by size and three 1 MiB samples. Cached per (path, size, times, inode).
    """
    p = Path(path)
    try:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            parts = [f"{f.relative_to(p)}={weights_fingerprint(f)}" for f in files]
            return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:8] if parts else "missing"
        stat = p.stat()
    except OSError:
        return "missing"
    # ctime too: any write changes it, even one that restores the size and mtime (cp -p, rsync -t)
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    with _fingerprints_lock:
        cached = _fingerprints.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha1(str(stat.st_size).encode())
    try:
        with open(p, "rb") as fh:
            if stat.st_size <= 3 * _SAMPLE_BYTES:
                digest.update(fh.read())
            else:
                for offset in (0, stat.st_size // 2, stat.st_size - _SAMPLE_BYTES):
                    fh.seek(offset)
                    digest.update(fh.read(_SAMPLE_BYTES))
    except OSError:
        return "missing"
    result = digest.hexdigest()[:8]
    with _fingerprints_lock:
        _fingerprints[key] = result
    return result


# ---- training (optional per family: see Backend.trainable / Backend.train) ----


@dataclass(frozen=True)
class BoxPct:
    """A rectangle as Label Studio stores it: percent of the shown image, rotated clockwise about (x, y)."""

    x: float
    y: float
    width: float
    height: float
    rotation: float
    label: str


@dataclass(frozen=True)
class Example:
    """One annotated task for one control tag: what a family's train() learns from.

    Labels are the config's own (already checked against it); spans are code-point offsets into
    `text` with `text[start:end]` the annotated text; boxes stay in Label Studio's percent form
    until TrainingRun.load_image() turns them into pixels of the image as shown (EXIF applied).
    """

    task_id: Any
    control: str  # the control tag (from_name)
    obj: str  # the object tag (to_name)
    text: str | None = None
    image: str | None = None  # the task's data value for the image (URL or path), resolved on demand
    spans: tuple[tuple[int, int, str], ...] = ()
    boxes: tuple[BoxPct, ...] = ()
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainResult:
    """What train() made: model_path relative to run.output_dir ("" = the folder itself), metrics."""

    model_path: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)


class TrainCancelled(Exception):
    """Raised by TrainingRun.progress() when the job was cancelled or the trainer is stopping."""


class TrainingRun(ABC):
    """One training job as a family sees it (serving/training/run.py implements it).

    The family trains `spec` (the pretrained model of the config) on `examples` for the config's
    `labels`, writes the result into `output_dir`, reports progress (which raises TrainCancelled when
    it must stop: a cancel, or the trainer shutting down), and saves a checkpoint after every epoch
    so that a killed trainer resumes at `start_epoch` from `checkpoint`.
    """

    spec: ModelSpec
    settings: Settings
    targets: tuple[Target, ...]
    labels: tuple[str, ...]
    examples: Sequence[Example]
    output_dir: Path
    device: str
    epochs: int  # the TRAIN_EPOCHS setting, 0 = the family's default
    start_epoch: int  # 1 on a fresh job; n + 1 after a checkpoint of epoch n
    checkpoint: Path | None  # the folder saved for epoch start_epoch - 1, None on a fresh job

    def epochs_or(self, default: int) -> int:
        """Return the number of epochs to train: the setting, else the family's default."""
        return self.epochs if self.epochs > 0 else default

    def learning_rate_or(self, default: float) -> float:
        """Return the learning rate: TRAIN_LEARNING_RATE when set, else the family's default."""
        value = float(getattr(self.settings, "train_learning_rate", 0.0) or 0.0)
        return value if value > 0 else default

    @abstractmethod
    def progress(
        self,
        epoch: int,
        step: int,
        loss: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        *,
        epochs: int | None = None,
        steps: int | None = None,
    ) -> None:
        """Record progress within an epoch (of `epochs`, step of `steps`); raise TrainCancelled to stop now."""

    @abstractmethod
    def end_epoch(self, epoch: int, loss: float, metrics: Mapping[str, Any] | None = None) -> None:
        """Record an epoch's mean loss and metrics (kept per epoch); raise TrainCancelled to stop now."""

    @abstractmethod
    def save_checkpoint(self, epoch: int, write: Callable[[Path], None]) -> None:
        """Save the state after `epoch`: write(folder) fills a fresh folder, committed atomically."""

    @abstractmethod
    def load_image(self, example: Example) -> tuple[Image.Image, np.ndarray, list[str]]:
        """Return the example's image as shown (RGB, EXIF applied), its boxes (N, 4) xyxy px, and labels."""


class Backend(ABC):
    """One model family. Subclass in backends/<family>.py; backends.registry() discovers it."""

    family: ClassVar[str] = ""
    control_tags: ClassVar[tuple[str, ...]] = ()
    object_tags: ClassVar[tuple[str, ...]] = ("Image",)
    input_kind: ClassVar[str] = "image"  # "image", "text", "audio" or "video": what the runtime resolves
    max_batch_size: ClassVar[int] = 8
    priority: ClassVar[int] = 100  # lower claims controls first
    fp16: ClassVar[bool] = True  # autocast on CUDA is safe for this family
    default_model: ClassVar[str] = ""
    aliases: ClassVar[Sequence[Collection[str]]] = ()
    default_threshold: ClassVar[float] = 0.5
    # Non-empty for a family that answers only interactive calls (a prompt is its input): a plain
    # /predict then answers each task without "result" and with this text as its "error", at once,
    # without running the model (see Runtime.predict).
    interactive_only: ClassVar[str] = ""
    # Label routing (serving/plan/routing.py). A zero-shot family predicts whatever labels it is
    # prompted with: it never takes a tag that names no model by itself, the planner routes it the
    # labels no closed-vocabulary model knows. `whole_tag`: it must answer all of a tag's labels
    # (one choice among all of a Choices tag's options), so a mixed tag goes to it whole.
    zero_shot: ClassVar[bool] = False
    whole_tag: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; never load weights here (load() runs in the worker)."""
        self.spec = spec
        self.settings = settings
        self.device = "cpu"
        # The runtime's batcher thread holds this lock around forward(); interactive() must
        # take it around its own model calls so one thread at a time touches the model.
        self.lock = threading.RLock()
        # The process-wide cache of image embeddings; the runtime attaches its own (with /metrics).
        self.embeddings: EmbeddingCache | None = None

    def embedding_cache(self) -> EmbeddingCache:
        """Return the embedding cache the runtime attached, or a private one sized by the settings."""
        if self.embeddings is None:
            from serving.util.embeddings import EmbeddingCache

            self.embeddings = EmbeddingCache(self.settings.embedding_cache_bytes)
        return self.embeddings

    # ---- planning (class level, cheap, no model loaded) ----
    @classmethod
    def model_names(cls) -> tuple[str, ...]:
        """Return the model_name values this family accepts."""
        return (cls.default_model,) if cls.default_model else ()

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True when a tag's model_name picks this family."""
        return name in cls.model_names()

    @classmethod
    def default_model_for(cls, settings: Settings) -> str:
        """Return the model used when a tag names none (may depend on settings)."""
        return cls.default_model

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Return the controls on one object this family fills (default: by control tag)."""
        if obj.tag not in cls.object_tags:
            return []
        claims = []
        for control in controls:
            if control.tag not in cls.control_tags:
                continue
            name = control.attr("model_name")
            if name and not cls.accepts_model(name):
                continue
            if cls.zero_shot and not name and not control.attr("model_path"):
                continue  # reached through routing (route_claim), which says why
            claims.append(
                Claim(
                    control=control,
                    model_name=name or cls.default_model_for(settings),
                    model_path=control.attr("model_path"),
                )
            )
        return claims

    @classmethod
    def known_labels(cls, spec: ModelSpec, control: ControlTag, settings: Settings) -> Collection[str] | None:
        """Return which of `control.labels` this closed-vocabulary model predicts (None: not told, keep all).

        Cheap (no model loaded): the planner routes the other labels of a tag that names no model
        to a zero-shot family. Map through LabelMap (predicted_values, names, aliases) as postprocess does.
        """
        return None

    @classmethod
    def route_claim(
        cls, obj: ObjectTag, claim: Claim, controls: Sequence[ControlTag], settings: Settings
    ) -> Claim | None:
        """Zero-shot families: claim a tag that names no model, to be prompted by its labels (else None).

        `claim` is the closed family's claim of the tag (its control and linked tags), or a bare
        Claim(control, "") for a tag no family took; `controls` are the object's other controls.
        """
        if not cls.zero_shot or obj.tag not in cls.object_tags or claim.control.tag not in cls.control_tags:
            return None
        return Claim(
            control=claim.control, model_name=cls.default_model_for(settings), linked=dict(claim.linked)
        )

    @classmethod
    def supported(cls) -> tuple[str, ...]:
        """Return what this family fills, as "Control on Object, ..." phrases (for error messages)."""
        return tuple(f"{tag} on {', '.join(cls.object_tags)}" for tag in cls.control_tags)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when the model can load, else why not and how to fix it (cheap check)."""
        return None

    # ---- runtime (instance level, in the worker process) ----
    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return what identifies this model's answers: its name and its weights (feeds model_version).

        A pure function of the spec, the settings and the files or packages the weights come from
        (see weights_fingerprint): computable before load(), the same in every worker and after a
        restart, and changed only when the model or its weights change. Never load state or errors.
        """
        return spec.name

    @classmethod
    def target_version(cls, target: Target, settings: Settings) -> str:
        """Return what besides the model shapes this target's answers (e.g. its prompt); "" for nothing.

        Like version_of, a pure function of the config and settings; a non-empty value joins the
        plan's model_version, so changing a tag's prompt makes Label Studio predict again.
        """
        return ""

    @abstractmethod
    def load(self, device: str) -> None:
        """Load weights onto the device; called once per worker process, off the request path."""

    def version(self) -> str:
        """Return version_of() for this instance's spec: the same before and after load()."""
        return type(self).version_of(self.spec, self.settings)

    def labels(self) -> Sequence[str]:
        """Return the model's vocabulary (for label maps and docs)."""
        return ()

    def input_scale(self, size: tuple[int, int]) -> float:
        """Return the scale preprocess() resizes an image of this (width, height) to (1 = full size).

        Below 1/2 the resolver may decode a JPEG smaller (item.image is then smaller than item.size,
        never smaller than this scale), so preprocess must resize to sizes computed from item.size.
        """
        return 1.0

    def audio_rate(self) -> int:
        """Return the sample rate (Hz) audio is resampled to for this model (input_kind "audio")."""
        return 16000

    def video_sampling(self, item: Item) -> Mapping[str, Any] | None:
        """Return how to sample this item's video where it differs from the VIDEO_* settings (None: it does not).

        Keys of serving.fetch.video.Sampling: fps, max_frames, max_side, max_seconds, start_s (an
        interactive call tracks every frame from the drawn one).
        """
        return None

    def preprocess(self, item: Item) -> Any:
        """Turn one decoded item into the model's input (CPU, thread pool)."""
        return item

    def preprocess_cached(self, item: Item, source: str) -> Any | None:
        """Return the model input for an item whose image need not be fetched, else None (the default).

        Called before the image is resolved (item.image is None; `source` is the task's data value):
        a backend that already holds what it needs, e.g. this image's cached embedding, answers here
        and skips the download and decode. It sets item.original_size when postprocess needs a size.
        """
        return None

    @abstractmethod
    def forward(self, batch: list[Any]) -> list[Any]:
        """Run the model on a batch; return exactly one CPU output per input (the only GPU step).

        The runtime calls it from the model's own thread, under torch.inference_mode() and,
        on CUDA when the family allows fp16, torch.autocast(float16); inputs go to self.device here.
        """

    @abstractmethod
    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Turn one output into Label Studio result items for one target (CPU)."""

    def interactive(
        self, item: Item, targets: Sequence[Target], context: Mapping[str, Any]
    ) -> list[dict[str, Any]] | None:
        """Answer an interactive call (params.context); None means use the normal path."""
        return None

    # ---- training (optional: families that learn from annotations override both) ----
    @classmethod
    def trainable(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return None when this model can be fine-tuned here, else why not (cheap, nothing loads)."""
        return f"the {cls.family} family is not trained on annotations"

    @classmethod
    def trains_target(cls, target: Target) -> str | None:
        """Return None when annotations of this target can train the model, else why not (cheap)."""
        return None

    @classmethod
    def train(cls, run: TrainingRun) -> TrainResult:
        """Fine-tune run.spec on run.examples for run.labels; write the model into run.output_dir.

        Runs in the trainer process (never in a request thread), one job at a time per device.
        The result is served as ModelSpec(family, spec.name, path=<version folder>/model/<model_path>),
        so availability(), load() and version_of() must accept it like a user checkpoint.
        """
        raise NotImplementedError(cls.trainable(run.spec, run.settings) or f"{cls.family} cannot train")

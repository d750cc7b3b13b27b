"""Video object tracking: VideoRectangle (with the Labels tag on the Video) from the server's image detectors.

Each sampled frame of a video (serving/fetch/video.py) goes through the image detector the label routing
would pick for the tag's labels on an image (torchvision's detector, RT-DETR, YOLO, or the open-vocabulary
family for labels no closed model knows; a `model_name` on the VideoRectangle tag names one), batched:
that detector's own preprocess, forward and postprocess run on the frames, so a video box is exactly the
box the image family gives. The boxes are linked into tracks by a ByteTrack-style tracker (_tracking.py),
one VideoRectangle region per track, its keyframes on the frames the editor shows them on.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar
from xml.sax.saxutils import quoteattr

from backends import _sam_video
from backends._tracking import ByteTracker, Detection, Track
from backends._video import frame_rate_of
from serving.contract import Backend, Claim, ControlTag, Item, ModelSpec, ObjectTag, Target
from serving.results import regions
from serving.results import video as video_regions

if TYPE_CHECKING:
    from serving.settings import Settings

log = logging.getLogger(__name__)

# A box this much weaker than the tag's threshold may still continue a track (ByteTrack's second stage).
LOW_SCORE = 0.1
BOX_TYPES = frozenset({"rectanglelabels", "rectangle"})


@dataclass
class VideoInput:
    """One video's frames as the image detector sees them: its frame items and preprocessed inputs."""

    frames: list[Item]
    inputs: list[Any]


def _image_config(obj: ObjectTag, control: ControlTag, labels: ControlTag | None) -> str:
    """Return the image labeling config whose plan says which detector serves these labels on a frame."""
    attrs = "".join(
        f" {k}={quoteattr(str(v))}"
        for k, v in control.attrs.items()
        if str(k).lower() in {"model_name", "model_path", "model_score_threshold"}
    )
    if labels is None or not labels.labels:
        return (
            f'<View><Image name="frame" value="$frame"/><Rectangle name="box" toName="frame"{attrs}/></View>'
        )
    children = []
    for label in labels.labels:
        value = labels.label_values.get(label, label)
        extra = f" alias={quoteattr(label)}" if value != label else ""
        predicted = labels.predicted_values.get(label)
        if predicted:
            extra += f" predicted_values={quoteattr(','.join(predicted))}"
        children.append(f"<Label value={quoteattr(value)}{extra}/>")
    body = "".join(children)
    return (
        f'<View><Image name="frame" value="$frame"/><RectangleLabels name="box" toName="frame"{attrs}>'
        f"{body}</RectangleLabels></View>"
    )


def drawn_box(
    context: Mapping[str, Any] | None, obj_name: str
) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """Return (region, its last keyframe) of the first videorectangle drawn on this video in `context`."""
    if not context:
        return None
    for region in context.get("result") or ():
        if not isinstance(region, Mapping) or region.get("type") != "videorectangle":
            continue
        if region.get("to_name") not in (None, obj_name):
            continue
        value = region.get("value")
        sequence = value.get("sequence") if isinstance(value, Mapping) else None
        keys = [k for k in sequence or () if isinstance(k, Mapping) and isinstance(k.get("frame"), int)]
        last = max(keys, key=lambda k: int(k["frame"])) if keys else None
        if last is not None and all(
            isinstance(last.get(n), int | float) for n in ("x", "y", "width", "height")
        ):
            return region, last
    return None


class VideoTrackingBackend(Backend):
    """Tracked boxes on a video: an image detector on sampled frames, boxes linked by ByteTrack."""

    family = "video_tracking"
    control_tags = ("VideoRectangle",)
    object_tags = ("Video",)
    input_kind = "video"
    max_batch_size = 1  # one video is already a batch of frames
    priority = 55
    # The image families a detector is picked from; None = the server's registry (tests plant their own).
    detector_families: ClassVar[Mapping[str, type[Backend]] | None] = None

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        """Store the spec; the detector loads in load(), SAM 2 video on the first drawn box."""
        super().__init__(spec, settings)
        self.detector: Backend | None = None
        self._sam: tuple[Any, Any] | None = None

    # ---- planning ----
    @classmethod
    def families(cls) -> Mapping[str, type[Backend]]:
        """Return the image families a detector may come from."""
        if cls.detector_families is not None:
            return cls.detector_families
        from backends import registry

        return {k: v for k, v in registry().items() if "Image" in v.object_tags}

    @classmethod
    def claim(cls, obj: ObjectTag, controls: Sequence[ControlTag], settings: Settings) -> list[Claim]:
        """Claim every VideoRectangle on a Video, with its sibling Labels tag and the detector routed to."""
        if obj.tag not in cls.object_tags:
            return []
        labels = next((c for c in controls if c.tag == "Labels"), None)
        out = []
        for control in controls:
            if control.tag not in cls.control_tags:
                continue
            picked = cls.pick_detector(obj, control, labels, settings)
            if picked is None:
                continue
            linked = {"labels": labels} if labels is not None else {}
            out.append(Claim(control, f"{picked.family}:{picked.name}", picked.path, linked))
        return out

    @classmethod
    def pick_detector(
        cls, obj: ObjectTag, control: ControlTag, labels: ControlTag | None, settings: Settings
    ) -> ModelSpec | None:
        """Return the image detector the label routing picks for this tag's labels (None: no detector)."""
        from serving.errors import ConfigError
        from serving.plan.planner import build_plan

        families = cls.families()
        name = control.attr("model_name")
        family, sep, model = name.partition(":")
        if sep and family in families:  # "detection:fcos_resnet50_fpn": that family's model
            attrs = {k: v for k, v in control.attrs.items() if str(k).lower() != "model_name"}
            control = replace(control, attrs={**attrs, "model_name": model})
            families = {family: families[family]}
        try:
            plan = build_plan(_image_config(obj, control, labels), settings, families)
        except ConfigError as exc:
            log.warning("video tag %s: no detector plan: %s", control.name, exc)
            return None
        specs = [spec for spec, _obj, _targets in plan.groups()]
        if not specs:
            return None
        # labels split between a closed and a zero-shot model: the zero-shot one is prompted with all
        zero_shot = [s for s in specs if getattr(families.get(s.family), "zero_shot", False)]
        return (zero_shot or specs)[0]

    @classmethod
    def _inner(cls, spec: ModelSpec) -> tuple[type[Backend], ModelSpec]:
        family, _, name = spec.name.partition(":")
        inner_cls = cls.families().get(family)
        if inner_cls is None:
            raise ValueError(f"no image family {family!r} for video tracking")
        return inner_cls, ModelSpec(family, name, spec.path, trained=spec.trained)

    @classmethod
    def accepts_model(cls, name: str) -> bool:
        """Return True for "family:model" names of an image detector family."""
        family, _, model = name.partition(":")
        inner = cls.families().get(family)
        return inner is not None and inner.accepts_model(model)

    @classmethod
    def availability(cls, spec: ModelSpec, settings: Settings) -> str | None:
        """Return why the detector cannot load (its own message and download command), else None."""
        import importlib.util

        inner_cls, inner_spec = cls._inner(spec)
        if importlib.util.find_spec("torch") is not None:
            # the parent package first: CPython 3.11 raises KeyError('torch') for `import torch.hub` (the
            # torchvision families' check) while another thread is importing torch
            importlib.import_module("torch")
        return inner_cls.availability(inner_spec, settings)

    @classmethod
    def version_of(cls, spec: ModelSpec, settings: Settings) -> str:
        """Return the detector's version and the tracker's."""
        inner_cls, inner_spec = cls._inner(spec)
        return f"{inner_spec.family}:{inner_cls.version_of(inner_spec, settings)}+bytetrack1"

    # ---- runtime ----
    def load(self, device: str) -> None:
        """Load the image detector on the device."""
        inner_cls, inner_spec = self._inner(self.spec)
        detector = inner_cls(inner_spec, self.settings)
        detector.embeddings = self.embeddings
        detector.load(device)
        self.detector = detector
        self.device = device

    def labels(self) -> Sequence[str]:
        """Return the detector's vocabulary."""
        return self.detector.labels() if self.detector is not None else ()

    def frame_target(self, target: Target) -> Target:
        """Return the image target the detector answers for one video target (its labels, a low threshold)."""
        source = target.linked.get("labels")
        tag = "RectangleLabels" if source is not None and source.labels else "Rectangle"
        control = ControlTag(
            name=target.control.name,
            tag=tag,
            to_name=target.obj.name,
            labels=source.labels if source is not None else (),
            attrs=dict(target.control.attrs),
            predicted_values=source.predicted_values if source is not None else {},
            label_values=source.label_values if source is not None else {},
        )
        obj = ObjectTag(target.obj.name, "Image", target.obj.value_key, dict(target.obj.attrs))
        _inner_cls, inner_spec = self._inner(self.spec)
        low = min(LOW_SCORE, target.threshold)
        return replace(target, control=control, obj=obj, model=inner_spec, threshold=low, linked={})

    # ---- interactive: a drawn box tracked forward by SAM 2 video ----
    def video_sampling(self, item: Item) -> Mapping[str, Any] | None:
        """Return every frame from the drawn one (VIDEO_TRACK_FRAMES of them) for a drawn box, else None."""
        drawn = drawn_box(item.context, item.obj.name)
        if drawn is None:
            return None
        rate = frame_rate_of(item.obj, item.task)
        start_s = (int(drawn[1]["frame"]) - 1) / rate
        frames = max(1, self.settings.video_track_frames)
        return {"fps": 0.0, "max_frames": frames, "start_s": start_s, "spread": False}

    def interactive(
        self, item: Item, targets: Sequence[Target], context: Mapping[str, Any]
    ) -> list[dict[str, Any]] | None:
        """Track the drawn box forward: its keyframes from the drawn frame on, one per decoded frame."""
        drawn = drawn_box(context, item.obj.name)
        if drawn is None or not item.frames:
            return None
        region, keyframe = drawn
        target = next((t for t in targets if t.control.name == region.get("from_name")), targets[0])
        size = item.frames[0].size
        box_px = regions.rect_pct_to_box_xyxy_px(keyframe, size)
        with self.lock:
            masks = self.track_masks(item.frames, box_px)
        rate = frame_rate_of(item.obj, item.task)
        count = video_regions.video_frames_count(item.duration, rate)
        first = video_regions.video_keyframe(int(keyframe["frame"]), rate, keyframe, True)
        sequence = [first]
        for index, mask in zip(item.frame_indices[1:], masks[1:], strict=False):
            box = _sam_video.mask_box(mask)
            if box is None:  # the object is gone: the box ends on the last frame it was seen
                sequence[-1]["enabled"] = False
                break
            frame = video_regions.video_frame(index, item.fps, rate, count)
            if frame > sequence[-1]["frame"]:
                pct = regions.box_xyxy_px_to_pct(box, size)
                sequence.append(video_regions.video_keyframe(frame, rate, pct, True))
        labels = region.get("value", {}).get("labels") or [None]
        region_id = str(region.get("id") or "") or None
        return [
            video_regions.video_rectangle_item(
                target, sequence, count, item.duration, 1.0, labels[0], region_id
            )
        ]

    def track_masks(self, frames: Sequence[Any], box_xyxy_px: Sequence[float]) -> list[Any]:
        """Return SAM 2 video's mask of the boxed object on every frame (frames[0] holds the box)."""
        if self._sam is None:
            self._sam = self._load_sam()
        model, processor = self._sam
        return _sam_video.track(model, processor, frames, box_xyxy_px, self.device)

    def _load_sam(self) -> tuple[Any, Any]:
        """Load SAM 2 video from the local SAM_MODEL checkpoint (InputError with the command when absent)."""
        from backends import _sam
        from serving.errors import InputError

        name = self.settings.sam_model or _sam.DEFAULT_MODEL
        folder = _sam.checkpoint_folder(name, self.settings.model_dir)
        if folder is None:
            raise InputError(
                f"tracking a drawn box needs SAM 2 weights ('{name}' is not on disk): run "
                "`python -m serving weights download --model sam` where internet exists, or set SAM_MODEL "
                "to a save_pretrained() folder"
            )
        return _sam_video.load(folder, self.device)

    def preprocess(self, item: Item) -> VideoInput | None:
        """Run the detector's own preprocess on every sampled frame (CPU pool); nothing for a drawn box."""
        assert self.detector is not None
        if drawn_box(item.context, item.obj.name) is not None:
            return None  # interactive() answers it with SAM 2 video
        frame_targets = tuple(self.frame_target(t) for t in item.targets)
        frames = []
        for image in item.frames:
            frames.append(Item(task=item.task, obj=frame_targets[0].obj, image=image, targets=frame_targets))
        return VideoInput(frames, [self.detector.preprocess(f) for f in frames])

    def forward(self, batch: list[Any]) -> list[Any]:
        """Run the detector on every video's frames, max_batch_size frames per forward."""
        assert self.detector is not None
        step = max(1, type(self.detector).max_batch_size)
        outputs = []
        for video in batch:
            per_frame: list[Any] = []
            for start in range(0, len(video.inputs), step):
                chunk = video.inputs[start : start + step]
                got = self.detector.forward(chunk)
                if len(got) != len(chunk):
                    raise RuntimeError(
                        f"{self.detector.family}.forward returned {len(got)} outputs for {len(chunk)}"
                    )
                per_frame.extend(got)
            outputs.append(per_frame)
        return outputs

    def postprocess(self, output: Any, target: Target, item: Item) -> list[dict[str, Any]]:
        """Link the frames' boxes into tracks; one VideoRectangle region per track."""
        assert self.detector is not None
        frame_target = self.frame_target(target)
        obj = frame_target.obj
        tracker = ByteTracker(high=target.threshold, low=frame_target.threshold, max_lost=self.max_lost(item))
        for position, (image, out) in enumerate(zip(item.frames, output, strict=True)):
            frame = Item(task=item.task, obj=obj, image=image, targets=(frame_target,))
            tracker.update(position, self.detections(out, frame_target, frame))
        return self.track_regions(tracker.tracks(), target, item)

    def detections(self, output: Any, frame_target: Target, frame: Item) -> list[Detection]:
        """Return one frame's boxes (percent xyxy) as the image family emits them for the frame target."""
        assert self.detector is not None
        found = []
        for region in self.detector.postprocess(output, frame_target, frame):
            if region.get("type") not in BOX_TYPES:
                continue
            value = region["value"]
            labels = value.get("rectanglelabels") or [None]
            x, y = float(value["x"]), float(value["y"])
            box = (x, y, x + float(value["width"]), y + float(value["height"]))
            found.append(Detection(box, float(region.get("score", 0.0)), labels[0]))
        return found

    def max_lost(self, item: Item) -> int:
        """Return how many samples a track may go unseen (VIDEO_TRACK_BUFFER_S in sampled frames)."""
        steps = [b - a for a, b in zip(item.frame_indices, item.frame_indices[1:], strict=False)]
        step = statistics.median(steps) if steps else 1
        frames = self.settings.video_track_buffer_s * (item.fps or 1.0)
        return max(1, math.ceil(frames / max(step, 1)))

    def track_regions(self, tracks: Sequence[Track], target: Target, item: Item) -> list[dict[str, Any]]:
        """Return one region per track: keyframes on editor frames, enabled: false where a track ends."""
        rate = frame_rate_of(item.obj, item.task)
        count = video_regions.video_frames_count(item.duration, rate)
        last_position = len(item.frame_indices) - 1
        out = []
        for track in tracks:
            sequence: list[dict[str, Any]] = []
            for position, box, _score in track.seen:
                frame = video_regions.video_frame(item.frame_indices[position], item.fps, rate, count)
                if sequence and sequence[-1]["frame"] == frame:
                    continue
                pct = {"x": box[0], "y": box[1], "width": box[2] - box[0], "height": box[3] - box[1]}
                sequence.append(video_regions.video_keyframe(frame, rate, pct, True))
            if track.last < last_position:
                sequence[-1]["enabled"] = False  # the object left: hide the box after its last frame
            out.append(
                video_regions.video_rectangle_item(
                    target, sequence, count, item.duration, track.score, track.label
                )
            )
        return out

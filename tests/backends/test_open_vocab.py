"""Open-vocabulary detection: claims, prompts from labels, chunking, span/query -> label mapping, NMS, loading.

Tiny random Grounding DINO / MM-Grounding-DINO / OWLv2 checkpoints are saved with save_pretrained and
loaded through the backend's own loading code (tests/backends/_open_vocab_support.py). Where an exact
answer is needed the logits are hand-built.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from backends import _open_vocab as ov
from backends import registry
from backends.open_vocab import OpenVocabBackend, OvInput
from serving.cli import weights
from serving.contract import Item, LabelMap, ModelSpec, ObjectTag, Target
from serving.plan.planner import build_plan, parse_config
from serving.settings import Settings
from tests.backends._open_vocab_support import Plant, bert_tokenizer, planted_family, save_dino, save_owl

IMAGE = ObjectTag("image", "Image", "image")


@pytest.fixture(autouse=True)
def _flush_denormals() -> Any:
    """Random weights produce denormal floats that make CPU runs crawl."""
    previous = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(previous)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoints of the three architectures (Grounding DINO prompts fit 32 tokens)."""
    root = tmp_path_factory.mktemp("ov")
    return {
        "dino": save_dino(root / "dino"),
        "mm": save_dino(root / "mm", mm=True, seed=1),
        "owl": save_owl(root / "owl"),
    }


def config(control: str) -> str:
    """Return a labeling config with one image and the given control tags."""
    return f'<View><Image name="image" value="$image"/>{control}</View>'


def plan_of(xml: str, **settings: Any) -> Any:
    """Plan a config with every real family."""
    return build_plan(xml, Settings(**settings), registry())


def only_target(xml: str, **settings: Any) -> Target:
    """Return the single target of a config."""
    (target,) = plan_of(xml, **settings).targets
    return target


def loaded(folder: Path, **settings: Any) -> OpenVocabBackend:
    """Load a backend from a checkpoint folder through load()."""
    backend = OpenVocabBackend(
        ModelSpec("open_vocab", "tiny", str(folder)), Settings(model_dir=str(folder.parent), **settings)
    )
    backend.load("cpu")
    return backend


def items_for(target: Target, sizes: list[tuple[int, int]], seed: int = 0) -> list[Item]:
    """Return noise images of the given sizes, predicted for one target."""
    rng = np.random.default_rng(seed)
    return [
        Item(
            task={"id": i},
            obj=IMAGE,
            image=Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
            targets=(target,),
        )
        for i, (w, h) in enumerate(sizes)
    ]


# ---- claims ----


def test_model_name_setting_and_path_pick_the_family(checkpoints: dict[str, Path]) -> None:
    rect = '<RectangleLabels name="r" toName="image"{attrs}><Label value="Forklift"/></RectangleLabels>'
    cases = [
        # Forklift is no COCO class: routed to the zero-shot detector (serving/plan/routing.py) ...
        ("", {}, "open_vocab", "grounding_dino"),
        # ... unless routing is off, when the tag stays with the closed detector
        ("", {"auto_route": False}, "detection", "fasterrcnn_resnet50_fpn_v2"),
        (' model_name="grounding_dino"', {}, "open_vocab", "grounding_dino"),
        (' model_name="OWLv2"', {}, "open_vocab", "owlv2"),
        (' model_name="mm_grounding_dino"', {}, "open_vocab", "mm_grounding_dino"),
        (
            ' model_name="IDEA-Research/grounding-dino-base"',
            {},
            "open_vocab",
            "IDEA-Research/grounding-dino-base",
        ),
        (' model_name="open_vocab:someone/my-detector"', {}, "open_vocab", "someone/my-detector"),
        ("", {"detector": "owlv2"}, "open_vocab", "owlv2"),
        ("", {"detector": "retinanet_resnet50_fpn_v2"}, "open_vocab", "grounding_dino"),
        (
            "",
            {"detector": "retinanet_resnet50_fpn_v2", "auto_route": False},
            "detection",
            "retinanet_resnet50_fpn_v2",
        ),
        (
            ' model_name="retinanet_resnet50_fpn_v2"',
            {"detector": "owlv2"},
            "detection",
            "retinanet_resnet50_fpn_v2",
        ),
        (f' model_path="{checkpoints["owl"]}"', {}, "open_vocab", "owlv2"),
        (f' model_path="{checkpoints["mm"]}"', {}, "open_vocab", "mm-grounding-dino"),
        (f' model_name="tiny" model_path="{checkpoints["dino"]}"', {}, "open_vocab", "tiny"),
    ]
    for attrs, settings, family, name in cases:
        target = only_target(config(rect.format(attrs=attrs)), **settings)
        assert (target.model.family, target.model.name) == (family, name), (attrs, settings)


def test_plain_rectangle_prompts_with_its_sibling_labels() -> None:
    xml = config(
        '<Rectangle name="box" toName="image" model_name="owlv2"/>'
        '<Labels name="lab" toName="image"><Label value="Pallet"/><Label value="Forklift"/></Labels>'
    )
    target = only_target(xml)
    assert target.model.family == "open_vocab"
    assert target.linked["labels"].name == "lab"
    assert [p.label for p in ov.label_prompts(ov.label_control(target))] == ["Pallet", "Forklift"]
    # Without a Labels tag there is nothing to prompt: the tag is left to no one (logged as unfilled).
    bare = config(
        '<Rectangle name="box" toName="image" model_name="owlv2"/>'
        '<RectangleLabels name="r" toName="image"><Label value="Car"/></RectangleLabels>'
    )
    plan = plan_of(bare)
    assert [t.control.name for t in plan.targets] == ["r"]
    assert plan.unfilled == ("box (Rectangle)",)


def test_ocr_rectangles_stay_with_ocr_when_detector_is_open_vocab() -> None:
    xml = config(
        '<Rectangle name="bbox" toName="image"/>'
        '<TextArea name="transcription" toName="image" perRegion="true"/>'
    )
    (target,) = plan_of(xml, detector="grounding_dino").targets
    assert target.model.family == "ocr"


def test_accepts_model_for_the_weights_command() -> None:
    for name in (
        "grounding_dino",
        "owlv2",
        "llmdet",
        "google/owlv2-large-patch14-ensemble",
        "open_vocab:x/y",
    ):
        assert OpenVocabBackend.accepts_model(name), name
    for name in ("fasterrcnn_resnet50_fpn_v2", "dslim/bert-base-NER", "en_core_web_sm", ""):
        assert not OpenVocabBackend.accepts_model(name), name


# ---- prompts ----


def test_prompts_from_values_synonyms_and_aliases() -> None:
    xml = config(
        '<RectangleLabels name="r" toName="image" model_name="grounding_dino">'
        '<Label value="Vest" predicted_values="Safety Vest, hi-vis jacket,safety vest"/>'
        '<Label value="Forklift"/>'
        '<Label value="Wooden Pallet" alias="P"/>'
        '<Label value="St. Bernard?"/>'
        "</RectangleLabels>"
    )
    _, controls = parse_config(xml)
    prompts = ov.label_prompts(controls[0])
    assert prompts == (
        ov.LabelPrompt("Vest", ("safety vest", "hi-vis jacket")),
        ov.LabelPrompt("Forklift", ("forklift",)),
        # Label Studio stores the alias; the readable value is the prompt
        ov.LabelPrompt("P", ("wooden pallet",)),
        # the prompt's phrase delimiters cannot appear inside a phrase
        ov.LabelPrompt("St. Bernard?", ("st bernard",)),
    )


def test_prompt_chunk_ids_equal_the_processors_tokens_of_the_joined_prompt() -> None:
    tokenizer = bert_tokenizer()
    entries = (ov.LabelPrompt("Vest", ("safety vest", "hi-vis jacket")), ov.LabelPrompt("Car", ("car",)))

    def tokenize(phrases: list[str]) -> list[list[int]]:
        return [list(ids) for ids in tokenizer(phrases, add_special_tokens=False)["input_ids"]]

    (chunk,) = ov.dino_chunks(entries, tokenize, 101, 102, 1012, 256)
    assert list(chunk.input_ids) == tokenizer("safety vest . hi-vis jacket . car .")["input_ids"]
    spans: dict[int, list[str]] = {}
    for token, phrase in zip(chunk.input_ids, chunk.token_phrase, strict=True):
        if phrase >= 0:
            spans.setdefault(phrase, []).append(tokenizer.convert_ids_to_tokens(token))
    assert spans == {0: ["safety", "vest"], 1: ["hi", "-", "vis", "jacket"], 2: ["car"]}
    assert chunk.phrase_entry == (0, 0, 1)


def test_300_labels_chunk_into_prompts_that_fit_and_keep_each_label_whole() -> None:
    tokenizer = bert_tokenizer()
    # "item<number>" tokenises into single letters and digits: 5-7 tokens a phrase
    entries = tuple(
        ov.LabelPrompt(f"Item {i}", (f"item{i}",) + ((f"thing{i}",) if i % 7 == 0 else ()))
        for i in range(300)
    )

    def tokenize(phrases: list[str]) -> list[list[int]]:
        return [list(ids) for ids in tokenizer(phrases, add_special_tokens=False)["input_ids"]]

    chunks = ov.dino_chunks(entries, tokenize, 101, 102, 1012, 256)
    assert len(chunks) > 1
    seen: list[int] = []
    for chunk in chunks:
        assert len(chunk.input_ids) <= 256
        assert chunk.input_ids[0] == 101 and chunk.input_ids[-1] == 102
        assert len(chunk.token_phrase) == len(chunk.input_ids)
        seen.extend(dict.fromkeys(chunk.phrase_entry))
        # each phrase's token span decodes back to its own phrase
        for phrase_index, entry in enumerate(chunk.phrase_entry):
            tokens = [
                t for t, p in zip(chunk.input_ids, chunk.token_phrase, strict=True) if p == phrase_index
            ]
            text = tokenizer.decode(tokens).replace(" ", "").replace("#", "")
            assert text in entries[entry].phrases
    assert seen == list(range(300))  # every label once, in order, never split over two chunks
    # greedy packing: no chunk could have taken the next label
    for chunk, following in itertools.pairwise(chunks):
        first_next = following.phrase_entry[0]
        cost = sum(len(tokenize([p])[0]) + 1 for p in entries[first_next].phrases)
        assert len(chunk.input_ids) + cost > 256


def test_a_label_longer_than_a_prompt_keeps_what_fits() -> None:
    tokenizer = bert_tokenizer()

    def tokenize(phrases: list[str]) -> list[list[int]]:
        return [list(ids) for ids in tokenizer(phrases, add_special_tokens=False)["input_ids"]]

    entries = (ov.LabelPrompt("Long", ("x" * 40, "car")), ov.LabelPrompt("Car", ("car",)))
    chunks = ov.dino_chunks(entries, tokenize, 101, 102, 1012, 16)
    assert [len(c.input_ids) for c in chunks] == [16, 4]
    assert chunks[0].phrase_entry == (0,) and chunks[1].phrase_entry == (1,)


# ---- decoding ----


def test_token_span_mapping_on_hand_built_logits() -> None:
    # [CLS] safety vest . hi vis jacket . car . [SEP] + 2 padding positions
    token_phrase = torch.tensor([-1, 0, 0, -1, 1, 1, 1, -1, 2, -1, -1])
    phrase_entry = torch.tensor([0, 0, 1])  # Vest: "safety vest", "hi vis jacket"; Car: "car"
    low, high = 0.05, 0.9
    probs = torch.full((1, 6, 13), low)
    probs[0, 0, [1, 2]] = torch.tensor([0.8, 0.6])  # both tokens of "safety vest": Vest, mean 0.7
    probs[0, 1, 8] = high  # "car": Car 0.9
    probs[0, 2, 2] = high  # only "vest" is lit, "safety" under the text threshold: no label
    probs[0, 3, [3, 7, 9]] = high  # only the delimiters: no label
    probs[0, 4, [4, 5, 6]] = torch.tensor([0.5, 0.4, 0.6])  # "hi vis jacket" 0.5 beats "car" 0.3 below
    probs[0, 4, 8] = 0.3
    probs[0, 5, [11, 12]] = high  # padding tokens beyond the prompt: ignored
    scores, entries = ov.dino_entry_scores(probs, token_phrase, phrase_entry, 2, text_threshold=0.25)
    assert entries[0, [0, 1, 4]].tolist() == [0, 1, 0]
    assert torch.allclose(scores[0], torch.tensor([0.7, 0.9, 0.0, 0.0, 0.5, 0.0]))
    # text threshold 0 lets the half-lit phrase through with its mean
    scores0, _ = ov.dino_entry_scores(probs, token_phrase, phrase_entry, 2, text_threshold=0.0)
    assert scores0[0, 2].item() == pytest.approx((low + high) / 2)


def test_query_index_mapping_on_hand_built_logits() -> None:
    query_entry = torch.tensor([0, 0, 1, 2])  # Vest has two queries (synonyms)
    logits = torch.full((1, 3, 4), -9.0)
    logits[0, 0, 1] = 2.0  # second synonym of Vest
    logits[0, 1, 2] = 1.0  # Car
    logits[0, 2, 3] = 0.0  # Forklift at 0.5, while Vest's first query gives 0.3 on this box
    logits[0, 2, 0] = float(np.log(0.3 / 0.7))
    scores, entries = ov.query_entry_scores(logits, query_entry, 3)
    assert entries[0].tolist() == [0, 1, 2]
    assert torch.allclose(scores[0], torch.sigmoid(torch.tensor([2.0, 1.0, 0.0])))


def test_per_label_nms_limit_and_floor() -> None:
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [0.5, 0.5, 10.0, 10.0],  # same label, IoU 0.9: suppressed
            [0.5, 0.5, 10.0, 10.0],  # other label on the same place: kept
            [20.0, 20.0, 30.0, 30.0],
            [40.0, 40.0, 50.0, 50.0],  # under the floor
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.05])
    entries = torch.tensor([0, 0, 1, 0, 1])
    assert ov.select(boxes, scores, entries, 0.1, 0.5, 100).tolist() == [0, 2, 3]
    assert ov.select(boxes, scores, entries, 0.1, 0.5, 2).tolist() == [0, 2]
    assert ov.select(boxes, scores, entries, 0.95, 0.5, 100).tolist() == []


def test_resize_matches_the_grounding_dino_processor(checkpoints: dict[str, Path]) -> None:
    from transformers import GroundingDinoImageProcessor

    processor = GroundingDinoImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333})
    for size in [(640, 480), (480, 640), (1920, 1080), (100, 3000), (800, 600), (1333, 800), (37, 23)]:
        pixel_values = processor(images=Image.new("RGB", size), return_tensors="pt")["pixel_values"]
        height, width = pixel_values.shape[-2:]
        assert ov.dino_resize(size, 800, 1333) == (width, height), size


# ---- the backend on tiny real architectures ----


def vest_car_target(model: str = "tiny", threshold: str = "0.0") -> Target:
    """A RectangleLabels target with synonyms: Vest (two phrases), Car, Forklift."""
    xml = config(
        f'<RectangleLabels name="r" toName="image" model_name="{model}" model_score_threshold="{threshold}">'
        '<Label value="Vest" predicted_values="safety vest,hi-vis jacket"/><Label value="Car"/>'
        '<Label value="Forklift"/></RectangleLabels>'
    )
    _, controls = parse_config(xml)
    control = controls[0]
    return Target(
        control=control,
        obj=IMAGE,
        model=ModelSpec("open_vocab", model),
        label_map=LabelMap(control.labels, control.predicted_values),
        threshold=float(threshold),
    )


def reference_dino(backend: OpenVocabBackend, x: OvInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image, one prompt chunk per model call, the model's own text encoding: the unbatched answer."""
    parts = []
    pixels, mask = backend._dino_pixels([x])
    with torch.inference_mode():
        for chunk in x.prompts.chunks:
            ids = torch.tensor([chunk.input_ids])
            out = backend.model(
                pixel_values=pixels, pixel_mask=mask, input_ids=ids, attention_mask=torch.ones_like(ids)
            )
            scores, entries = ov.dino_entry_scores(
                out.logits.sigmoid(),
                torch.tensor(chunk.token_phrase),
                torch.tensor(chunk.phrase_entry),
                len(x.prompts.entries),
                backend.text_threshold,
            )
            w, h = x.size
            boxes = ov.cxcywh_to_xyxy(out.pred_boxes[0]) * torch.tensor([w, h, w, h])
            parts.append((boxes, scores[0], entries[0]))
        det = backend._finish(x, parts)
    return det.boxes_xyxy_px, det.scores, det.entries


@pytest.mark.parametrize("arch", ["dino", "mm"])
def test_batched_chunks_with_cached_text_equal_one_call_per_image_and_chunk(
    checkpoints: dict[str, Path], arch: str
) -> None:
    backend = loaded(checkpoints[arch], text_threshold=0.0)
    target = vest_car_target()
    # 22 labels do not fit one 32-token prompt: several chunks, run as one batch with the images
    xml = config(
        '<RectangleLabels name="r" toName="image" model_name="tiny" model_score_threshold="0.0">'
        + "".join(f'<Label value="Thing {c}" predicted_values="car {c}"/>' for c in "abcdefghijklmnopqrst")
        + '<Label value="Vest" predicted_values="safety vest,hi-vis jacket"/><Label value="Car"/></RectangleLabels>'
    )
    _, controls = parse_config(xml)
    target = Target(controls[0], IMAGE, ModelSpec("open_vocab", "tiny"), vest_car_target().label_map, 0.0)
    inputs = [backend.preprocess(item) for item in items_for(target, [(120, 80)] * 3)]
    assert len(inputs[0].prompts.chunks) >= 3
    batched = backend.forward(inputs)
    assert inputs[0].prompts.cache, "text features are cached on the prompt set"
    for x, det in zip(inputs, batched, strict=True):
        boxes, scores, entries = reference_dino(backend, x)
        assert len(scores) > 0
        np.testing.assert_allclose(det.scores, scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(det.boxes_xyxy_px, boxes, rtol=1e-4, atol=1e-3)
        assert det.entries.tolist() == entries.tolist()
    # the same again without the text cache (the model encodes the prompts itself in every call)
    backend.cache_text = False
    again = backend.forward(inputs)
    for a, b in zip(batched, again, strict=True):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-5)


def test_owlv2_matches_the_models_own_forward(checkpoints: dict[str, Path]) -> None:
    backend = loaded(checkpoints["owl"])
    target = vest_car_target()
    inputs = [backend.preprocess(item) for item in items_for(target, [(120, 80), (64, 100)])]
    dets = backend.forward(inputs)
    prompts = inputs[0].prompts
    assert prompts.query_entry == (0, 0, 1, 2)
    ids = torch.tensor(prompts.query_ids)
    mask = torch.tensor(prompts.query_mask)
    for x, det in zip(inputs, dets, strict=True):
        canvas = torch.zeros((1, 3, backend.side, backend.side))
        h, w = x.tensor.shape[1:]
        canvas[0, :, :h, :w] = x.tensor.float() / 255
        pixels = (canvas - backend.mean) / backend.std
        with torch.inference_mode():
            out = backend.model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        scores, entries = ov.query_entry_scores(out.logits, torch.tensor(prompts.query_entry), 3)
        boxes = ov.cxcywh_to_xyxy(out.pred_boxes[0]) * float(max(x.size))
        ref = backend._finish(x, [(boxes, scores[0], entries[0])])
        assert len(ref.scores) > 0
        np.testing.assert_allclose(det.scores, ref.scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(det.boxes_xyxy_px, ref.boxes_xyxy_px, rtol=1e-4, atol=1e-3)
        assert det.entries.tolist() == ref.entries.tolist()


def planted(folder: Path, plants: list[Plant], **settings: Any) -> OpenVocabBackend:
    """Load a checkpoint through load() with planted answers on top of the real model."""
    backend = planted_family(plants)(
        ModelSpec("open_vocab", "tiny", str(folder)), Settings(model_dir=str(folder.parent), **settings)
    )
    backend.load("cpu")
    return backend


def test_only_config_labels_and_the_tags_own_labels_are_emitted(checkpoints: dict[str, Path]) -> None:
    plants = [
        Plant("car", (0.0, 0.0, 0.5, 0.5)),
        Plant("helmet", (0.5, 0.5, 1.0, 1.0)),
        Plant("bus", (0.0, 0.5, 0.5, 1.0)),
        Plant("truck", (0.5, 0.0, 1.0, 0.5)),  # not a config label: never asked, never emitted
    ]
    backend = planted(checkpoints["owl"], plants)
    xml = config(
        '<RectangleLabels name="a" toName="image" model_name="tiny" model_score_threshold="0.5">'
        '<Label value="Car"/><Label value="Bus"/></RectangleLabels>'
        '<RectangleLabels name="b" toName="image" model_name="tiny" model_score_threshold="0.5">'
        '<Label value="Helmet"/></RectangleLabels>'
    )
    _, controls = parse_config(xml)
    targets = [
        Target(c, IMAGE, ModelSpec("open_vocab", "tiny"), LabelMap(c.labels, c.predicted_values), 0.5)
        for c in controls
    ]
    (item,) = items_for(targets[0], [(100, 100)])
    item.targets = tuple(targets)
    x = backend.preprocess(item)
    assert [e.label for e in x.prompts.entries] == ["Car", "Bus", "Helmet"]
    (det,) = backend.forward([x])
    assert sorted(det.labels()) == ["Bus", "Car", "Helmet"]
    regions_a = backend.postprocess(det, targets[0], item)
    regions_b = backend.postprocess(det, targets[1], item)
    assert sorted(r["value"]["rectanglelabels"][0] for r in regions_a) == ["Bus", "Car"]
    (helmet,) = regions_b
    assert helmet["value"]["rectanglelabels"] == ["Helmet"]
    assert {k: helmet["value"][k] for k in ("x", "y", "width", "height")} == pytest.approx(
        {"x": 50.0, "y": 50.0, "width": 50.0, "height": 50.0}
    )


def test_max_detections_caps_boxes_per_image(checkpoints: dict[str, Path]) -> None:
    plants = [Plant("car", (0.1 * k, 0.0, 0.1 * k + 0.05, 0.1), logit=2.0 + k) for k in range(5)]
    backend = planted(checkpoints["owl"], plants, max_detections=3)
    (x,) = [backend.preprocess(item) for item in items_for(vest_car_target(), [(100, 100)])]
    (det,) = backend.forward([x])
    assert det.labels() == ["Car"] * 3
    np.testing.assert_allclose(det.scores, torch.sigmoid(torch.tensor([6.0, 5.0, 4.0])).numpy(), rtol=1e-5)
    np.testing.assert_allclose(det.boxes_xyxy_px[:, 0], [40.0, 30.0, 20.0], atol=1e-3)


def test_prompt_set_is_built_once_per_plan(checkpoints: dict[str, Path]) -> None:
    backend = loaded(checkpoints["dino"])
    target = vest_car_target()
    first = [backend.preprocess(item) for item in items_for(target, [(50, 40), (60, 40)])]
    assert first[0].prompts is first[1].prompts
    backend.forward(first)
    cached = dict(first[0].prompts.cache)
    later = backend.preprocess(items_for(target, [(70, 40)])[0])
    assert later.prompts is first[0].prompts
    backend.forward([later])
    # the text features computed for the first batch are the very tensors used again
    assert all(later.prompts.cache[k] is v for k, v in cached.items())


def test_default_threshold_is_the_models_own_and_the_tag_overrides_it(checkpoints: dict[str, Path]) -> None:
    dino = loaded(checkpoints["dino"])
    owl = loaded(checkpoints["owl"])
    untouched = vest_car_target(threshold="0.0")
    no_attr = Target(
        untouched.control.__class__(**{**untouched.control.__dict__, "attrs": {"model_name": "tiny"}}),
        IMAGE,
        untouched.model,
        untouched.label_map,
        0.3,
    )
    assert dino.threshold_of(no_attr) == 0.3
    assert owl.threshold_of(no_attr) == 0.1
    assert owl.threshold_of(untouched) == 0.0


# ---- loading, weights, versions ----


def test_availability_and_version_of_are_pure(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(model_dir=str(tmp_path))
    folder = tmp_path / "gd"
    shutil.copytree(checkpoints["dino"], folder)
    spec = ModelSpec("open_vocab", "grounding-dino", str(folder))
    assert OpenVocabBackend.availability(spec, settings) is None
    before = OpenVocabBackend.version_of(spec, settings)
    backend = OpenVocabBackend(spec, settings)
    backend.load("cpu")
    assert backend.version() == before == OpenVocabBackend.version_of(spec, settings)
    assert before.startswith("grounding-dino@") and not before.endswith("missing")
    # relative model_path lives under MODEL_DIR
    assert OpenVocabBackend.version_of(ModelSpec("open_vocab", "grounding-dino", "gd"), settings) == before
    # new weights, new version
    save_dino(folder, seed=5)
    assert OpenVocabBackend.version_of(spec, settings) != before

    missing = ModelSpec("open_vocab", "grounding_dino")
    reason = OpenVocabBackend.availability(missing, settings)
    assert reason is not None and "python -m serving weights download --model grounding_dino" in reason
    assert OpenVocabBackend.version_of(missing, settings) == "grounding_dino@missing"
    bad = ModelSpec("open_vocab", "x", str(tmp_path / "nowhere"))
    assert "not a save_pretrained() folder" in str(OpenVocabBackend.availability(bad, settings))
    with pytest.raises(RuntimeError, match="weights download"):
        OpenVocabBackend(missing, settings).load("cpu")


def test_a_checkpoint_in_the_hugging_face_cache_loads_by_its_id(
    checkpoints: dict[str, Path], isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetched checkpoint lives in the HF cache as snapshots/<revision>/...: found there, loaded offline."""
    repo = ov.KNOWN["owlv2"].repo
    cache = Path(str(isolated_env / "hf_home")) / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    shutil.copytree(checkpoints["owl"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    settings = Settings(model_dir=str(isolated_env))
    spec = ModelSpec("open_vocab", "owlv2")
    assert OpenVocabBackend.availability(spec, settings) is None
    assert OpenVocabBackend.version_of(spec, settings).startswith("owlv2@")
    status = {s.model: s.present for s in OpenVocabBackend.weights_status(settings)}
    assert status["owlv2"] and not status["grounding_dino"]
    backend = OpenVocabBackend(spec, settings)
    backend.load("cpu")
    assert backend.kind == "owl"


def test_weights_download_fetches_named_and_default_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    calls: list[tuple[str, tuple[str, ...]]] = []

    def fake_snapshot_download(repo: str, allow_patterns: list[str]) -> str:
        calls.append((repo, tuple(allow_patterns)))
        folder = tmp_path / repo.replace("/", "--")
        if not folder.exists():
            shutil.copytree(checkpoints["owl"], folder)
            if "llmdet" in repo:  # published without safetensors: the second call fetches *.bin
                (folder / "model.safetensors").unlink()
        elif any("bin" in p for p in allow_patterns):
            (folder / "pytorch_model.bin").write_bytes(b"weights")
        return str(folder)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    settings = Settings(model_dir=str(tmp_path))
    families = {"open_vocab": OpenVocabBackend}
    assert weights.download(settings, families, ["grounding_dino", "llmdet"]) == 0
    assert [c[0] for c in calls] == [
        "IDEA-Research/grounding-dino-tiny",
        "iSEE-Laboratory/llmdet_tiny",
        "iSEE-Laboratory/llmdet_tiny",
    ]
    assert "*.safetensors" in calls[0][1] and not any("bin" in p for p in calls[0][1])
    calls.clear()
    assert weights.download(settings, families) == 0
    assert [c[0] for c in calls] == [ov.KNOWN[n].repo for n in ov.DEFAULT_DOWNLOADS]
    # through the whole registry: the name reaches this family
    calls.clear()
    assert weights.download(settings, {"open_vocab": OpenVocabBackend, **registry()}, ["owlv2"]) == 0
    assert [c[0] for c in calls] == ["google/owlv2-base-patch16-ensemble"]


# ---- CUDA (run wherever it is available) ----


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["dino", "owl"])
def test_cuda_fp16_agrees_with_cpu_fp32(checkpoints: dict[str, Path], arch: str) -> None:
    """The runtime's CUDA path (fp16 autocast) finds the CPU's best boxes, labels and scores."""
    cpu = loaded(checkpoints[arch], text_threshold=0.0)
    gpu = OpenVocabBackend(cpu.spec, cpu.settings)
    gpu.load("cuda")
    target = vest_car_target()
    items = items_for(target, [(120, 80), (90, 100)])
    want = cpu.forward([cpu.preprocess(it) for it in items])
    with torch.autocast("cuda", dtype=torch.float16):
        got = gpu.forward([gpu.preprocess(it) for it in items])
    for a, b in zip(want, got, strict=True):
        assert len(a.scores) > 0 and np.isfinite(b.scores).all()
        assert b.entries[0] == a.entries[0]
        assert b.scores[0] == pytest.approx(a.scores[0], abs=2e-2)
        np.testing.assert_allclose(b.boxes_xyxy_px[0], a.boxes_xyxy_px[0], atol=1.0)

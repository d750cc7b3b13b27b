"""Fine-tuning the NER family on a project's annotations (spaCy pipelines and transformers token classifiers).

Both engines learn the config's own label set. A config label that the pretrained model already
predicts under some name (Person <- PERSON/PER through the label map) is trained under that name, so
what the model knows is the starting point; a label it lacks (Drug, Product...) is added.

- spaCy: the pipeline's `ner` gets the new labels and is updated on the annotated spans; the
  pretrained model's own entities on the same texts whose types the config does not ask for
  (DATE, CARDINAL...) are rehearsed as gold, so updating on a few hundred texts does not make
  it forget them (pseudo-rehearsal). Annotated spans always win; config types are what annotators
  marked. CPU, minutes for hundreds of texts.
- transformers: the classifier head is rebuilt for BIO tags of the config's labels (rows of
  labels the old head knew are copied over), the whole model is fine-tuned with AdamW, in mixed
  precision on CUDA; the saved folder is served by the same decoder (exact character offsets).

Both save a checkpoint after every epoch (a killed trainer resumes there) and report the span F1
per label on held-out texts (10%, when there are at least 50 examples) or on the training texts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends._train_loop import Optimization, amp_setup, linear_decay, train_epochs
from serving.contract import Example, ModelSpec, Target, TrainingRun, TrainResult
from serving.training.examples import precision_recall_f1, split_holdout

log = logging.getLogger(__name__)

SPACY_EPOCHS = 10
HF_EPOCHS = 5
SEED = 13


def model_label_for(target: Target, config_label: str, model_labels: Sequence[str]) -> str:
    """Return the model label a config label trains as: one the model already maps to it, else itself."""
    for label in model_labels:
        if target.label_map(label) == config_label:
            return label
    return config_label


def span_f1(
    gold: Sequence[Sequence[tuple[int, int, str]]], found: Sequence[Sequence[tuple[int, int, str]]]
) -> dict[str, Any]:
    """Return exact-match span precision/recall/F1, overall and per label."""
    labels = sorted({s[2] for spans in (*gold, *found) for s in spans})
    per: dict[str, Any] = {}
    tp_all = fp_all = fn_all = 0
    for label in labels:
        tp = fp = fn = 0
        for g, f in zip(gold, found, strict=True):
            gs = {s for s in g if s[2] == label}
            fs = {s for s in f if s[2] == label}
            tp += len(gs & fs)
            fp += len(fs - gs)
            fn += len(gs - fs)
        per[label] = precision_recall_f1(tp, fp, fn)
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    return {**precision_recall_f1(tp_all, fp_all, fn_all), "per_label": per}


def evaluate(backend_cls: Any, run: TrainingRun, folder: Path, examples: Sequence[Example]) -> dict[str, Any]:
    """Load the saved model through the family's serving path and score its spans on `examples`."""
    if not examples:
        return {}
    spec = ModelSpec(run.spec.family, run.spec.name, str(folder))
    backend = backend_cls(spec, run.settings)
    backend.load(run.device)
    targets = {t.control.name: t for t in run.targets}
    texts = [e.text or "" for e in examples]
    outputs = backend.forward(texts)
    found = []
    for example, spans in zip(examples, outputs, strict=True):
        target = targets.get(example.control) or run.targets[0]
        mapped = []
        for start, end, label, _score in spans:
            config_label = target.label_map(str(label))
            if config_label is not None:
                mapped.append((int(start), int(end), config_label))
        found.append(mapped)
    return span_f1([list(e.spans) for e in examples], found)


# ---------------------------------------------------------------------------------------------- spaCy


def train_spacy(backend_cls: Any, run: TrainingRun, package: str) -> TrainResult:
    """Update a spaCy pipeline's ner on the examples, rehearsing its own out-of-config entities."""
    import spacy
    from spacy.training import Example as SpacyExample
    from spacy.util import filter_spans, fix_random_seed

    fix_random_seed(SEED)  # the same data gives the same model (dropout, initial weights of new labels)

    pretrained = spacy.load(package)
    ner_name = _ner_component(pretrained)
    pretrained_ner: Any = pretrained.get_pipe(ner_name)
    model_labels = tuple(pretrained_ner.labels)
    train, held_out = split_holdout(run.examples)
    texts = [e.text or "" for e in train]
    # what the pretrained model finds on the same texts: the rehearsal targets
    with pretrained.select_pipes(enable=_ner_pipes(pretrained, ner_name)):
        predicted = [
            [(e.start_char, e.end_char, e.label_) for e in doc.ents] for doc in pretrained.pipe(texts)
        ]
    targets = {t.control.name: t for t in run.targets}

    def gold(example: Example, found: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
        target = targets.get(example.control) or run.targets[0]
        config_types = set(target.label_map.config_labels)
        out = []
        for start, end, label in example.spans:
            # the pretrained name of this entity when it agrees (GPE vs LOC both mean Location)
            same = [m for s, e, m in found if (s, e) == (start, end) and target.label_map(m) == label]
            out.append((start, end, same[0] if same else model_label_for(target, label, model_labels)))
        taken = [(s, e) for s, e, _ in out]
        for start, end, label in found:
            if target.label_map(label) in config_types:
                continue  # annotators decided about these types
            if any(start < e and s < end for s, e in taken):
                continue
            out.append((start, end, label))
        return out

    nlp = spacy.load(run.checkpoint) if run.checkpoint is not None else pretrained
    ner: Any = nlp.get_pipe(ner_name)
    for example in train:
        target = targets.get(example.control) or run.targets[0]
        for _, _, label in example.spans:
            name = model_label_for(target, label, model_labels)
            if name not in ner.labels:
                ner.add_label(name)
                log.info("spaCy ner: new label %s", name)

    def spacy_examples() -> list[Any]:
        made = []
        for example, found in zip(train, predicted, strict=True):
            doc = nlp.make_doc(example.text or "")
            ref = nlp.make_doc(example.text or "")
            spans = [
                ref.char_span(s, e, label=label, alignment_mode="expand")
                for s, e, label in gold(example, found)
            ]
            ref.ents = filter_spans([s for s in spans if s is not None])
            made.append(SpacyExample(doc, ref))
        return made

    data = spacy_examples()

    def step(chunk: list[int], rng: random.Random) -> tuple[float, None]:
        losses: dict[str, float] = {}
        nlp.update([data[i] for i in chunk], sgd=optimizer, drop=0.2, losses=losses)
        return float(losses.get(ner_name, 0.0)) / max(1, len(chunk)), None

    with nlp.select_pipes(enable=_ner_pipes(nlp, ner_name)):
        optimizer = nlp.resume_training()
        train_epochs(run, len(data), 8, run.epochs_or(SPACY_EPOCHS), step, nlp.to_disk, seed=SEED)
    nlp.to_disk(run.output_dir)
    metrics = evaluate(backend_cls, run, run.output_dir, held_out or train)
    metrics = {"on": "held_out" if held_out else "train", "examples": len(train), **metrics}
    return TrainResult("", metrics)


def _ner_component(nlp: Any) -> str:
    for name in nlp.pipe_names:
        try:
            factory = str(nlp.get_pipe_meta(name).factory)
        except Exception:
            factory = name
        if factory in ("ner", "beam_ner"):
            return str(name)
    raise RuntimeError(f"the spaCy pipeline has no trainable ner component (pipes: {nlp.pipe_names})")


def _ner_pipes(nlp: Any, ner_name: str) -> list[str]:
    """Return the ner component and the embedders it listens to (the rest stays off while training)."""
    keep = [ner_name]
    for name, pipe in nlp.pipeline:
        if ner_name in (getattr(pipe, "listening_components", None) or []):
            keep.append(name)
    return keep


# ---------------------------------------------------------------------------------------------- transformers


def bio_tags(labels: Sequence[str]) -> list[str]:
    """Return the BIO tag list of a label set: O, B-x, I-x, ..."""
    return ["O", *(f"{prefix}-{label}" for label in labels for prefix in ("B", "I"))]


def token_labels(
    offsets: np.ndarray, special: np.ndarray, spans: Sequence[tuple[int, int, str]], tag_id: Mapping[str, int]
) -> np.ndarray:
    """Return the BIO label id of each token from character spans (-100 on special tokens).

    A token belongs to the span its first character falls in; the span's first token is B-, the
    others I-. Vectorised over tokens: one searchsorted against the sorted span starts.
    """
    n = len(offsets)
    out = np.zeros(n, dtype=np.int64)
    out[special] = -100
    if spans:
        ordered = sorted(spans)
        starts = np.array([s for s, _, _ in ordered], dtype=np.int64)
        ends = np.array([e for _, e, _ in ordered], dtype=np.int64)
        begin = np.array([tag_id.get(f"B-{label}", 0) for *_, label in ordered], dtype=np.int64)
        inside = np.array([tag_id.get(f"I-{label}", 0) for *_, label in ordered], dtype=np.int64)
        first_char = offsets[:, 0]
        k = np.searchsorted(starts, first_char, side="right") - 1
        inside_span = (k >= 0) & ~special & (offsets[:, 1] > offsets[:, 0])
        kk = np.clip(k, 0, None)
        inside_span &= first_char < ends[kk]
        # the first token of each span: the first one whose span index is k
        prev = np.concatenate([[-1], np.where(inside_span, kk, -1)[:-1]])
        is_first = inside_span & (prev != kk)
        out[inside_span] = np.where(is_first[inside_span], begin[kk[inside_span]], inside[kk[inside_span]])
    return out


def train_transformers(backend_cls: Any, run: TrainingRun, source: str) -> TrainResult:
    """Fine-tune a token classifier with a head for the config's labels (BIO); save_pretrained() the result."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    torch.manual_seed(SEED)
    labels = list(run.labels)
    tags = bio_tags(labels)
    tag_id = {t: i for i, t in enumerate(tags)}
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise RuntimeError(f"'{source}' has no fast tokenizer: character offsets need one")
    model = AutoModelForTokenClassification.from_pretrained(source, local_files_only=True)
    _resize_head(model, tags, run.targets[0])
    device = run.device
    model.to(device)
    train, held_out = split_holdout(run.examples)
    max_length = min(256, int(getattr(model.config, "max_position_embeddings", 512) or 512))
    if "roberta" in str(getattr(model.config, "model_type", "")):
        max_length -= 2
    windows = _windows(tokenizer, train, tag_id, max_length)
    epochs = run.epochs_or(HF_EPOCHS)
    batch_size = 16
    steps = (len(windows) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=run.learning_rate_or(5e-5), weight_decay=0.01
    )
    opt = Optimization(
        optimizer, linear_decay(optimizer, steps * epochs), *amp_setup(device, prefer_bf16=True)
    )
    opt.resume(run, model, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def step(chunk_ids: list[int], rng: random.Random) -> tuple[float, None]:
        chunk = [windows[i] for i in chunk_ids]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (tok, lab) in enumerate(chunk):
            ids[row, : len(tok)] = torch.as_tensor(tok)
            mask[row, : len(tok)] = 1
            target[row, : len(lab)] = torch.as_tensor(lab)
        with opt.autocast():
            loss = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), labels=target.to(device)
            ).loss
        opt.step(loss, max_norm=1.0)
        return float(loss.detach()), None

    train_epochs(
        run, len(windows), batch_size, epochs, step, opt.writer(model), seed=SEED, begin_epoch=model.train
    )
    model.eval()
    model.to("cpu")
    model.save_pretrained(run.output_dir)
    tokenizer.save_pretrained(run.output_dir)
    metrics = evaluate(backend_cls, run, run.output_dir, held_out or train)
    return TrainResult("", {"on": "held_out" if held_out else "train", "examples": len(train), **metrics})


def _resize_head(model: Any, tags: list[str], target: Target) -> None:
    """Give the model a classifier for `tags`, copying rows of tags the old head knew (B-PER -> B-Person)."""
    import torch

    head = next(
        (
            getattr(model, name)
            for name in ("classifier", "score")
            if isinstance(getattr(model, name, None), torch.nn.Linear)
        ),
        None,
    )
    if head is None:
        raise RuntimeError(f"{type(model).__name__} has no linear classifier head to resize")
    old_tags = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    new = torch.nn.Linear(head.in_features, len(tags), bias=head.bias is not None)
    with torch.no_grad():
        for i, tag in enumerate(tags):
            prefix, _, label = tag.partition("-")
            for j, old in old_tags.items():
                if j >= head.out_features:
                    continue
                old_prefix, _, old_label = old.partition("-")
                same = (
                    old == tag
                    if tag == "O"
                    else (old_prefix == prefix and target.label_map(old_label) == label)
                )
                if same:
                    new.weight[i] = head.weight[j]
                    if new.bias is not None and head.bias is not None:
                        new.bias[i] = head.bias[j]
                    break
    name = "classifier" if getattr(model, "classifier", None) is head else "score"
    setattr(model, name, new)
    model.config.num_labels = len(tags)
    model.config.id2label = dict(enumerate(tags))
    model.config.label2id = {t: i for i, t in enumerate(tags)}
    if hasattr(model, "num_labels"):
        model.num_labels = len(tags)


def _windows(
    tokenizer: Any, examples: Sequence[Example], tag_id: Mapping[str, int], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Tokenise every text into overlapping windows with their token labels."""
    texts = [e.text or "" for e in examples]
    if not texts:
        return []
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        stride=max_length // 4,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    out = []
    for w, sample in enumerate(enc["overflow_to_sample_mapping"]):
        offsets = np.asarray(enc["offset_mapping"][w], dtype=np.int64).reshape(-1, 2)
        special = np.array([x is None for x in enc.word_ids(w)], dtype=bool)
        labels = token_labels(offsets, special, examples[sample].spans, tag_id)
        out.append((list(enc["input_ids"][w]), labels.tolist()))
    return out

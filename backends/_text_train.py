"""Training the text classification family on a project's annotations: a fine-tuned classifier, or a CPU baseline.

One model answers every classification tag of the config's object, so it learns them all at once:
its classes are each tag's choices in turn, and `lsml_groups` in its config.json says which classes
are whose (a softmax per single-choice tag, sigmoids for `choice="multiple"`, exactly as it is served).

- On CUDA (or on a CPU with TRAIN_ALLOW_CPU=true): the tag's transformers model (the NLI model by
  default) gets a new classification head and is fine-tuned with AdamW in mixed precision.
- On a CPU: the baseline of backends/_text_baseline.py (logistic regression on hashed word n-grams),
  seconds for a few hundred texts.

Both checkpoint every epoch (a killed trainer resumes) and report accuracy and micro F1 on held-out
texts (10%, from 50 examples) or on the training texts, for the model before and after training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from typing import Any

from backends import _text_baseline as baseline
from backends import _text_inputs as inputs
from backends._train_loop import Optimization, amp_setup, linear_decay, train_epochs
from serving.contract import Example, Item, ModelSpec, Target, TrainingRun, TrainResult
from serving.training.examples import precision_recall_f1, split_holdout

log = logging.getLogger(__name__)

SEED = 17
HF_EPOCHS = 4
BASELINE_EPOCHS = 30
NGRAM_DROPOUT = 0.5
GROUPS = "lsml_groups"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The trained model's classes: config labels tag after tag, and each tag's class ids."""

    classes: tuple[str, ...]
    groups: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, targets: Sequence[Target]) -> Layout:
        """Return the classes of every target (its choices, or a Taxonomy's nodes) in config order."""
        classes: list[str] = []
        groups: dict[str, dict[str, Any]] = {}
        for target in targets:
            labels = list(target.label_map.config_labels)
            ids = list(range(len(classes), len(classes) + len(labels)))
            classes.extend(labels)
            groups[target.control.name] = {"classes": ids, "multiple": inputs.is_multiple(target)}
        return cls(tuple(classes), groups)

    def config(self) -> dict[str, Any]:
        """Return what the saved config.json carries: id2label, label2id (first id of a name) and the groups."""
        label2id: dict[str, int] = {}
        for i, name in enumerate(self.classes):
            label2id.setdefault(name, i)
        return {"id2label": dict(enumerate(self.classes)), "label2id": label2id, GROUPS: self.groups}


def example_item(example: Example, target: Target, spec: ModelSpec | None = None) -> Item:
    """Return the Item the serving path would see for an example (Paragraphs / Table from their JSON)."""
    value: Any = None
    text: str | None = example.text or ""
    if target.obj.tag in ("Paragraphs", "Table") and text:
        try:
            value, text = json.loads(text), None
        except ValueError:
            pass
    targets = (target,) if spec is None else (dataclasses.replace(target, model=spec),)
    return Item(task={"id": example.task_id}, obj=target.obj, text=text, value=value, targets=targets)


def train(run: TrainingRun, backend_cls: Any) -> TrainResult:
    """Train for the config's tags (fine-tune on CUDA / TRAIN_ALLOW_CPU, else the CPU baseline); report before/after."""
    targets = {t.control.name: t for t in run.targets}
    layout = Layout.of(run.targets)
    examples = [e for e in run.examples if e.control in targets]
    train_set, held_out = split_holdout(examples)
    scored = held_out or train_set
    before = evaluate(backend_cls, run, run.spec, scored)
    use_baseline = not run.device.startswith("cuda") and not run.settings.train_allow_cpu
    texts = [inputs.text_of(example_item(e, targets[e.control])) for e in train_set]
    if use_baseline:
        _fit_baseline(run, layout, train_set, texts)
    else:
        _fine_tune(run, backend_cls, layout, train_set, texts)
    after = evaluate(backend_cls, run, dataclasses.replace(run.spec, path=str(run.output_dir)), scored)
    metrics = {
        "on": "held_out" if held_out else "train",
        "examples": len(train_set),
        "engine": "hashed-ngram baseline" if use_baseline else "fine-tuned transformer",
        "before": before,
        **after,
    }
    return TrainResult("", metrics)


def _targets_of(layout: Layout, examples: Sequence[Example]) -> list[tuple[str, list[int]]]:
    """Return per example its tag and the class ids of its chosen labels."""
    out = []
    for e in examples:
        ids = layout.groups[e.control]["classes"]
        names = [layout.classes[i] for i in ids]
        out.append((e.control, [ids[names.index(c)] for c in e.choices if c in names]))
    return out


def _loss(logits: Any, layout: Layout, gold: Sequence[tuple[str, list[int]]]) -> Any:
    """Return the batch loss: cross-entropy within a single-choice tag, binary cross-entropy for multiple."""
    import torch

    parts = []
    for row, (control, chosen) in enumerate(gold):
        group = layout.groups[control]
        ids = group["classes"]
        slice_ = logits[row, ids].float()
        if group["multiple"]:
            target = torch.zeros(len(ids), device=logits.device)
            for c in chosen:
                target[ids.index(c)] = 1.0
            parts.append(torch.nn.functional.binary_cross_entropy_with_logits(slice_, target))
        elif chosen:
            index = torch.tensor([ids.index(chosen[0])], device=logits.device)
            parts.append(torch.nn.functional.cross_entropy(slice_.unsqueeze(0), index))
    if not parts:
        return logits.sum() * 0.0
    return torch.stack(parts).mean()


def _fit_baseline(run: TrainingRun, layout: Layout, examples: Sequence[Example], texts: list[str]) -> None:
    """Fit the hashed n-gram baseline with Adam; save it as run.output_dir."""
    import torch

    torch.manual_seed(SEED)
    model = baseline.build(len(layout.classes))
    feats = [baseline.features(t) for t in texts]
    gold = _targets_of(layout, examples)
    epochs = run.epochs_or(BASELINE_EPOCHS)
    batch_size = 16
    optimizer = torch.optim.Adam(model.parameters(), lr=run.learning_rate_or(0.1))
    # a constant rate: a convex model, and a decaying one stops before the rare n-grams have weight
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    opt = Optimization(optimizer, constant, *amp_setup("cpu"))
    opt.resume(run, model, "cpu")

    def step(chunk: list[int], rng: random.Random) -> tuple[float, None]:
        # n-gram dropout: each kept n-gram must tell the choice on its own, so unseen mixes generalise
        kept = [[f for f in feats[i] if rng.random() >= NGRAM_DROPOUT] or feats[i][:1] for i in chunk]
        width = max(len(k) for k in kept)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, k in enumerate(kept):
            ids[row, : len(k)] = torch.as_tensor(k)
        loss = _loss(model(input_ids=ids).logits, layout, [gold[i] for i in chunk])
        opt.step(loss)
        return float(loss.detach()), None

    train_epochs(
        run, len(feats), batch_size, epochs, step, opt.writer(model), seed=SEED, begin_epoch=model.train
    )
    baseline.save(model.eval(), run.output_dir, layout.config())


def _fine_tune(
    run: TrainingRun, backend_cls: Any, layout: Layout, examples: Sequence[Example], texts: list[str]
) -> None:
    """Fine-tune the tag's transformers model with a new head for the layout's classes; save_pretrained() it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(SEED)
    source = backend_cls._folder(run.spec, run.settings)
    if source is None:
        raise RuntimeError(backend_cls.availability(run.spec, run.settings) or "checkpoint missing")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = layout.config()
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(layout.classes),
        id2label=config["id2label"],
        label2id=config["label2id"],
        ignore_mismatched_sizes=True,
    )
    _new_head(model)
    setattr(model.config, GROUPS, layout.groups)
    model.config.problem_type = None
    device = run.device
    model.to(device)
    max_length = min(256, int(getattr(model.config, "max_position_embeddings", 512) or 512))
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    rows = [list(ids) for ids in enc["input_ids"]]
    gold = _targets_of(layout, examples)
    epochs = run.epochs_or(HF_EPOCHS)
    batch_size = 16
    steps = (len(rows) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.learning_rate_or(3e-5), weight_decay=0.01)
    opt = Optimization(
        optimizer, linear_decay(optimizer, steps * epochs), *amp_setup(device, prefer_bf16=True)
    )
    opt.resume(run, model, device)
    pad = int(tokenizer.pad_token_id or 0)

    def step(chunk: list[int], rng: random.Random) -> tuple[float, None]:
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(rows[i])] = torch.as_tensor(rows[i])
            mask[row, : len(rows[i])] = 1
        with opt.autocast():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        loss = _loss(logits, layout, [gold[i] for i in chunk])
        opt.step(loss, max_norm=1.0)
        return float(loss.detach()), None

    train_epochs(
        run, len(rows), batch_size, epochs, step, opt.writer(model), seed=SEED, begin_epoch=model.train
    )
    model.eval().to("cpu")
    model.save_pretrained(run.output_dir)
    tokenizer.save_pretrained(run.output_dir)


def _new_head(model: Any) -> None:
    """Re-initialise the last linear layer of the classification head (the new task's classes)."""
    import torch

    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    last = head if isinstance(head, torch.nn.Linear) else getattr(head, "out_proj", None)
    if not isinstance(last, torch.nn.Linear):
        raise RuntimeError(f"{type(model).__name__} has no linear classification head to replace")
    with torch.no_grad():
        last.weight.normal_(0.0, 0.02)
        if last.bias is not None:
            last.bias.zero_()


def evaluate(
    backend_cls: Any, run: TrainingRun, spec: ModelSpec, examples: Sequence[Example]
) -> dict[str, Any]:
    """Serve `spec` through the family's own path on the examples; return accuracy and micro F1 of the choices."""
    if not examples:
        return {}
    reason = backend_cls.availability(spec, run.settings)
    if reason:
        return {"skipped": reason}
    import torch

    backend = backend_cls(spec, run.settings)
    backend.load(run.device)
    targets = {t.control.name: dataclasses.replace(t, model=spec) for t in run.targets}
    tp = fp = fn = exact = 0
    for first in range(0, len(examples), 32):
        chunk = examples[first : first + 32]
        items = [example_item(e, targets[e.control], spec) for e in chunk]
        with torch.inference_mode():
            outputs = backend.forward([backend.preprocess(item) for item in items])
        for example, item, output in zip(chunk, items, outputs, strict=True):
            found = set(_chosen(backend.postprocess(output, targets[example.control], item)))
            gold = set(example.choices)
            tp, fp, fn = tp + len(found & gold), fp + len(found - gold), fn + len(gold - found)
            exact += found == gold
    return {"accuracy": round(exact / len(examples), 4), **precision_recall_f1(tp, fp, fn)}


def _chosen(items: Sequence[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for item in items:
        value = item.get("value", {})
        out.extend(value.get("choices", []))
        out.extend(path[-1] for path in value.get("taxonomy", []) if path)
    return out

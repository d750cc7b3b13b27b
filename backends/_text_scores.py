"""From logits to choices for the text classification family: NLI and classifier scores, thresholds, visibleWhen.

NLI (transformers' zero-shot-classification semantics): a choice's logit is the entailment logit of
its best phrase. Single choice: softmax over the choices' entailment logits. Multiple (or a tag with
one choice): per choice, softmax of (contradiction, entailment), the entailment side. A classifier:
softmax over its classes (sigmoid for a multi-label head), probabilities of classes that map to one
config choice summed (max for multi-label). Long texts: single choice averages the windows'
distributions (the text as a whole); multiple takes each choice's best window (a label applies when
any part of the text says so).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from backends._text_inputs import Candidates
from serving.contract import Target


@dataclass(frozen=True)
class Decision:
    """What one tag answers: the chosen candidates (best first) and every candidate's probability."""

    chosen: tuple[int, ...]
    probs: np.ndarray


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Return softmax along an axis (float64, stable)."""
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def per_choice(values: np.ndarray, cands: Candidates) -> np.ndarray:
    """Return, per candidate, the max over its phrases of the last axis (phrases flattened in order)."""
    out = []
    k = 0
    for phrases in cands.hypotheses:
        out.append(values[..., k : k + len(phrases)].max(axis=-1))
        k += len(phrases)
    return np.stack(out, axis=-1)


def nli_probs(logits: np.ndarray, cands: Candidates, entail: int, contra: int, multiple: bool) -> np.ndarray:
    """Return per candidate its probability from (windows, phrases, classes) NLI logits."""
    logits = logits.astype(np.float64)
    if multiple or len(cands.names) == 1:
        pair = softmax(logits[..., [contra, entail]])[..., 1]  # (W, H)
        return per_choice(pair, cands).max(axis=0)
    entailment = per_choice(logits[..., entail], cands)  # (W, K)
    return softmax(entailment, axis=1).mean(axis=0)


def classifier_probs(
    logits: np.ndarray, choice_of_class: np.ndarray, k: int, multi_label: bool
) -> np.ndarray:
    """Return per config choice its probability from (windows, classes) logits; unmapped classes are dropped."""
    logits = logits.astype(np.float64)
    fed = choice_of_class >= 0
    if multi_label:
        probs = (1.0 / (1.0 + np.exp(-logits))).max(axis=0)
        out = np.zeros(k)
        for cls_index in np.flatnonzero(fed):
            out[choice_of_class[cls_index]] = max(out[choice_of_class[cls_index]], probs[cls_index])
        return out
    probs = softmax(logits, axis=1).mean(axis=0)
    return np.bincount(choice_of_class[fed], weights=probs[fed], minlength=k)[:k]


def threshold_of(target: Target, multiple: bool) -> float:
    """Return the tag's threshold: model_score_threshold, else 0.5 for yes/no answers, 0 for one choice of several."""
    if target.option("model_score_threshold").strip():
        return target.threshold
    return 0.5 if multiple else 0.0


def choose(target: Target, probs: np.ndarray, multiple: bool) -> tuple[int, ...]:
    """Return the chosen candidates, best first: every one over the threshold (multiple), else the best."""
    if probs.size == 0:
        return ()
    threshold = threshold_of(target, multiple or probs.size == 1)
    if multiple:
        return tuple(int(i) for i in np.argsort(-probs, kind="stable") if probs[i] >= threshold)
    best = int(np.argmax(probs))
    return (best,) if probs[best] >= threshold and probs[best] > 0 else ()


def chosen_names(target: Target, cands: Candidates, decision: Decision) -> set[str]:
    """Return every label the decision selects (a Taxonomy path's nodes too), as names and readable values."""
    names: set[str] = set()
    for i in decision.chosen:
        for label in cands.paths[i]:
            names.add(label)
            names.add(target.control.label_values.get(label, label))
    return names


def visible(
    target: Target, targets: Sequence[Target], chosen_of: Callable[[Target], set[str] | None]
) -> bool:
    """Return True when a tag shows for the answers so far (visibleWhen choice-selected / choice-unselected).

    The parent must be one of `targets` (answered by the same model): an unknown parent hides the tag,
    so a child choice never leaves without its parent chosen.
    """
    when = target.option("visibleWhen").strip().lower()
    if when not in ("choice-selected", "choice-unselected"):
        return True
    parent_name = target.option("whenTagName").strip()
    if not parent_name:
        return True
    parent = next((t for t in targets if t.control.name == parent_name), None)
    chosen = chosen_of(parent) if parent is not None else None
    if chosen is None:
        return False
    values = [v.strip() for v in target.option("whenChoiceValue").split(",") if v.strip()]
    hit = any(v in chosen for v in values) if values else bool(chosen)
    return hit if when == "choice-selected" else not hit

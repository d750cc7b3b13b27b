"""Prompts for the generation family: a tag's `model_prompt` template or a default per object and purpose, and strict choice parsing.

No model here: what to ask (system prompt, user prompt, image, token budget) and how a reply becomes
a config choice. The defaults are documented in README (section "Generation").
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from string import Template
from typing import Any

from serving.contract import Item, Target

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a careful data annotator. Reply with the requested text only, with no preamble."
MAX_NEW_TOKENS_CAP = 4096
CHOICES_MAX_TOKENS = 32

# The default prompts, by purpose; {language} and {choices} are filled in, the content follows.
DEFAULTS: dict[str, str] = {
    "caption": "Describe this image in one or two sentences.",
    "vqa": "Answer the question about this image briefly.\nQuestion: {question}",
    "summary": "Summarise the following text in one sentence.",
    "translation": "Translate the following text into {language}. Reply with the translation only.",
    "answer": "Answer the following question briefly.",
    "response": "Write a helpful response to the following message.",
    "dialogue_summary": "Summarise the following conversation in one sentence.",
    "dialogue_response": "Write the next reply in the following conversation.",
    "choices": "Which of these choices applies? Choices: {choices}.\nReply with {how}, exactly as written, nothing else.",
    "rating": "Rate the above from 1 (worst) to {top} (best). Reply with the number only.",
}

# Languages a TextArea's name or placeholder may name ("spanish", "Translation (German)...").
LANGUAGES = (
    "English",
    "Spanish",
    "French",
    "German",
    "Italian",
    "Portuguese",
    "Dutch",
    "Russian",
    "Ukrainian",
    "Polish",
    "Czech",
    "Swedish",
    "Norwegian",
    "Danish",
    "Finnish",
    "Greek",
    "Turkish",
    "Arabic",
    "Hebrew",
    "Hindi",
    "Bengali",
    "Chinese",
    "Japanese",
    "Korean",
    "Vietnamese",
    "Thai",
    "Indonesian",
)
_QUESTION_KEYS = ("question", "query", "prompt")
_RESPONSE_WORDS = ("response", "reply", "completion", "respond")


@dataclass(frozen=True)
class Request:
    """One generation: system and user prompts, an optional image, and a token budget."""

    system: str
    prompt: str
    image: Any = None  # a PIL image for vision models
    max_new_tokens: int = 256


@dataclass(frozen=True)
class Reply:
    """A model's answer to one request: the text, a confidence in [0, 1], or why it failed."""

    text: str = ""
    score: float = 1.0
    error: str = ""


def content_of(item: Item) -> str:
    """Return the text an object shows: its text, an HTML page's visible text, or a dialogue's "author: text" lines."""
    if item.text is not None and item.obj.tag == "HyperText":
        from serving.results import hypertext

        # the visible text, as the labeling page shows it: no markup, scripts or hidden parts
        inline, encoding, _ = hypertext.object_options(item.obj.attrs)
        try:
            html = hypertext.decode_value(item.text, encoding)
        except ValueError:
            html = item.text
        return hypertext.parse_html(html, inline).text.strip()
    if item.text is not None:
        return item.text
    if isinstance(item.value, list):
        name_key = _attr(item.obj.attrs, "nameKey") or "author"
        text_key = _attr(item.obj.attrs, "textKey") or "text"
        lines = []
        for para in item.value:
            if isinstance(para, Mapping):
                who = str(para.get(name_key, "") or "").strip()
                said = str(para.get(text_key, "") or "")
                lines.append(f"{who}: {said}" if who else said)
        return "\n".join(lines)
    return ""


def _attr(attrs: Mapping[str, str], key: str) -> str:
    lowered = {str(k).lower(): v for k, v in attrs.items()}
    return str(lowered.get(key.lower(), "") or "")


def language_of(target: Target) -> str:
    """Return the language a TextArea names (model_language, else its name or placeholder), or ""."""
    asked = target.option("model_language").strip()
    if asked:
        return asked
    words = f"{target.control.name} {target.option('placeholder')}".lower()
    for language in LANGUAGES:
        if re.search(rf"\b{language.lower()}\b", words) or words.strip() == language.lower():
            return language
    return ""


def question_in(task: Mapping[str, Any]) -> str:
    """Return the question a task holds (data.question, .query or .prompt), or ""."""
    data = task.get("data")
    if not isinstance(data, Mapping):
        return ""
    for key in _QUESTION_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def purpose(target: Target, item: Item | None = None) -> str:
    """Return which default prompt a target gets: caption, vqa, translation, summary, answer, response..."""
    if target.control.tag == "Choices":
        return "choices"
    if target.control.tag == "Rating":
        return "rating"
    words = f"{target.control.name} {target.option('placeholder')}".lower()
    if target.obj.tag == "Image":
        return "vqa" if item is not None and question_in(item.task) else "caption"
    if language_of(target) or "translat" in words:
        return "translation"
    dialogue = target.obj.tag == "Paragraphs"
    if any(w in words for w in _RESPONSE_WORDS):
        return "dialogue_response" if dialogue else "response"
    if dialogue:
        return "dialogue_summary"
    if item is not None and content_of(item).rstrip().endswith("?"):
        return "answer"
    return "summary"


def max_tokens(target: Target, default: int) -> int:
    """Return the tag's model_max_tokens (bounded), else the default (smaller for Choices)."""
    raw = target.option("model_max_tokens").strip()
    fallback = CHOICES_MAX_TOKENS if target.control.tag in ("Choices", "Rating") else default
    try:
        value = int(raw) if raw else fallback
    except ValueError:
        log.warning("model_max_tokens=%r on %s is not a number; using %d", raw, target.control.name, fallback)
        value = fallback
    return max(1, min(MAX_NEW_TOKENS_CAP, value))


def choice_names(target: Target) -> list[str]:
    """Return the choices as the model should see them (the readable value of an aliased choice)."""
    return [target.control.label_values.get(c, c) for c in target.control.labels]


def multiple(target: Target) -> bool:
    """Return True when the Choices tag takes several answers."""
    return target.option("choice", "single").strip().lower() == "multiple"


def _fill(template: str, task: Mapping[str, Any], extra: Mapping[str, str]) -> str:
    """Substitute $keys of the task's data (and extra names) into a template; unknown keys stay as written."""
    data = task.get("data")
    values: dict[str, str] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            values[str(key)] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    values.update(extra)
    return Template(template).safe_substitute(values)


def template_of(target: Target) -> str:
    """Return the prompt template a target uses (its model_prompt, else the default of its purpose)."""
    return target.option("model_prompt").strip()


def build(target: Target, item: Item, system: str, default_max_tokens: int) -> Request:
    """Return the request for one target on one item: the filled prompt, the content, the image."""
    text = content_of(item) if item.image is None else ""
    choices = choice_names(target)
    how = "one or more of the choices, separated by commas" if multiple(target) else "exactly one choice"
    extra = {
        "choices": ", ".join(choices),
        "language": language_of(target) or "English",
        "top": str(max_rating(target)),
    }
    custom = template_of(target)
    if custom:
        prompt = _fill(custom, item.task, extra)
        # the object's content goes where the template names its key, else after the prompt
        mentions = bool(item.obj.value_key) and f"${item.obj.value_key}" in custom
        if text and not mentions:
            prompt = f"{prompt}\n\n{text}"
    else:
        kind = purpose(target, item)
        head = DEFAULTS[kind].format(
            language=extra["language"],
            choices=extra["choices"],
            how=how,
            question=question_in(item.task),
            top=extra["top"],
        )
        prompt = f"{head}\n\n{text}" if text else head
        if kind in ("choices", "rating") and text:
            prompt = f"{text}\n\n{head}"
    return Request(
        system=system or DEFAULT_SYSTEM,
        prompt=prompt,
        image=item.image,
        max_new_tokens=max_tokens(target, default_max_tokens),
    )


def target_version(target: Target, system: str, default_max_tokens: int) -> str:
    """Return a short digest of what shapes a target's prompt (template or default, system, budget)."""
    custom = template_of(target)
    parts = [
        system or DEFAULT_SYSTEM,
        custom or json.dumps(DEFAULTS, sort_keys=True),
        str(max_tokens(target, default_max_tokens)),
        target.option("model_language"),
    ]
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:8]


_STRIP = " \t\r\n.\"'`*:;!()[]"


def parse_choices(reply: str, target: Target) -> list[str]:
    """Return the config choices a reply names, strictly; a reply naming anything else gives [] (logged).

    Single choice: the whole reply (trimmed of quotes, punctuation, a "Answer:" lead) must be one of
    the choices. Multiple: every comma- or line-separated part must be one; one made-up part drops all.
    """
    text = reply.strip()
    text = re.sub(r"^(answer|choice|choices|label)\s*:\s*", "", text, flags=re.IGNORECASE)
    parts = [p.strip(_STRIP) for p in re.split(r"[,\n]", text)] if multiple(target) else [text.strip(_STRIP)]
    parts = [p for p in parts if p]
    by_value = {v.casefold(): c for c, v in zip(target.control.labels, choice_names(target), strict=True)}
    chosen: list[str] = []
    for part in parts:
        config = by_value.get(part.casefold())
        mapped = target.label_map(config if config is not None else part)
        if mapped is None:
            log.info(
                "choices %s: the model answered %r, which is not one of %s; nothing stored",
                target.control.name,
                reply[:200],
                choice_names(target),
            )
            return []
        if mapped not in chosen:
            chosen.append(mapped)
    return chosen


def max_rating(target: Target) -> int:
    """Return a Rating tag's maxRating (5 by default, Label Studio's)."""
    try:
        value = int(target.option("maxRating", "5").strip() or "5")
    except ValueError:
        return 5
    return value if value > 0 else 5


def parse_rating(reply: str, target: Target) -> int | None:
    """Return the rating a reply gives, strictly: one whole number from 1 to maxRating (a "4/5" allowed), else None (logged)."""
    text = re.sub(r"^(rating|score|answer)\s*:\s*", "", reply.strip(), flags=re.IGNORECASE).strip(_STRIP)
    top = max_rating(target)
    match = re.fullmatch(rf"(\d+)(?:\s*(?:/|out of)\s*{top})?", text)
    value = int(match.group(1)) if match else None
    if value is None or not 1 <= value <= top:
        log.info(
            "rating %s: the model answered %r, not a whole number from 1 to %d; nothing stored",
            target.control.name,
            reply[:200],
            top,
        )
        return None
    return value

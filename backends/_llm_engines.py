"""Generation engines: transformers in process (one batched generate) and any OpenAI-compatible server.

Both take a list of prompts (backends/_llm_prompts.Request) and return one Reply per prompt, in order;
a failure of one prompt is that reply's `error`, never an exception that would fail the whole batch.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backends._llm_prompts import Reply, Request

log = logging.getLogger(__name__)


def _messages(request: Request, vision: bool) -> list[dict[str, Any]]:
    """Return the chat of one request for a chat template: system, then the user turn (image first)."""
    user: Any = request.prompt
    if vision:
        user = [{"type": "image"}, {"type": "text", "text": request.prompt}]
    return [{"role": "system", "content": request.system}, {"role": "user", "content": user}]


class TransformersEngine:
    """A chat model of transformers (AutoModelForCausalLM, or AutoModelForImageTextToText for images)."""

    def __init__(self, folder: str, vision: bool, timeout_s: float) -> None:
        """Remember what to load; load() builds it."""
        self.folder = folder
        self.vision = vision
        self.timeout_s = timeout_s
        self.model: Any = None
        self.processor: Any = None  # the processor (vision) or the tokenizer (text)
        self.tokenizer: Any = None
        self.device = "cpu"
        # Extra logits processors run on every generate (tests plant answers through one).
        self.logits_processors: list[Any] = []

    def load(self, device: str) -> None:
        """Load the model in bf16 (fp16 without bf16) on CUDA, fp32 on the CPU, and its left-padding tokenizer."""
        import torch
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        dtype = torch.float32
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.vision:
            self.processor = AutoProcessor.from_pretrained(self.folder)
            self.tokenizer = self.processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(self.folder, dtype=dtype)
        else:
            self.processor = self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=dtype)
        # decoder-only models continue the last token: pad on the left so every row ends in its prompt
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        self.device = device

    def _chat_text(self, request: Request) -> str:
        """Return one prompt through the model's chat template (system folded in where it has no system role)."""
        # Qwen3-style text templates think aloud unless told not to; processors take no such flag
        extra: dict[str, Any] = {} if self.vision else {"enable_thinking": False}
        try:
            return str(
                self.processor.apply_chat_template(
                    _messages(request, self.vision), tokenize=False, add_generation_prompt=True, **extra
                )
            )
        except Exception:  # some templates (Gemma) reject a system turn
            folded = Request(
                "", f"{request.system}\n\n{request.prompt}", request.image, request.max_new_tokens
            )
            messages = _messages(folded, self.vision)[1:]
            return str(
                self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )

    def encode(self, requests: Sequence[Request]) -> Any:
        """Return the padded batch of prompts (and images) as tensors on the model's device."""
        texts = [self._chat_text(r) for r in requests]
        if self.vision:
            enc = self.processor(
                text=texts, images=[[r.image] for r in requests], padding=True, return_tensors="pt"
            )
        else:
            enc = self.processor(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return enc.to(self.device)

    def generate(self, requests: Sequence[Request]) -> list[Reply]:
        """Generate every request in one greedy generate call; trim each row to its own token budget."""
        import torch
        from transformers import LogitsProcessorList

        if not requests:
            return []
        enc = self.encode(requests)
        budget = max(r.max_new_tokens for r in requests)
        out = self.model.generate(
            **enc,
            max_new_tokens=budget,
            do_sample=False,
            max_time=self.timeout_s,
            logits_processor=LogitsProcessorList(self.logits_processors),
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        start = enc["input_ids"].shape[1]
        generated = out.sequences[:, start:].cpu()
        logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        logprobs = logprobs.float().cpu()
        stops = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        stops |= set(_as_list(getattr(self.model.generation_config, "eos_token_id", None)))
        replies = []
        for row, request in enumerate(requests):
            tokens = generated[row].tolist()[: request.max_new_tokens]
            length = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True).strip()
            kept = logprobs[row, : max(length, 1)]
            kept = kept[torch.isfinite(kept)]
            score = math.exp(float(kept.mean())) if kept.numel() else 0.0
            replies.append(Reply(text=text, score=min(1.0, max(0.0, score))))
        return replies


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def data_uri(image: Any) -> str:
    """Return a PIL image as a JPEG data URI (PNG when it has transparency) for the chat API."""
    buf = io.BytesIO()
    if image.mode in ("RGBA", "LA", "P"):
        image.save(buf, format="PNG")
        mime = "image/png"
    else:
        image.convert("RGB").save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


class RemoteError(Exception):
    """A request to the generation server failed; `retryable` says whether trying later may succeed."""

    def __init__(self, message: str, retryable: bool) -> None:
        """Keep the message (never the key) and whether to retry."""
        super().__init__(message)
        self.retryable = retryable


class OpenAIEngine:
    """Chat completions on an OpenAI-compatible server (vLLM, Ollama, TGI, llama.cpp, hosted APIs).

    At most `concurrency` requests in flight per process; 429 and 5xx answers and connection errors
    are retried `retries` times with exponential backoff (Retry-After honoured, capped); a timeout or
    a last failure becomes that prompt's error, which the family turns into a retryable task failure.
    The API key goes only into the Authorization header: it is never logged nor put in an error.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        concurrency: int = 8,
        retries: int = 3,
        timeout_s: float = 60.0,
        backoff_s: float = 0.5,
    ) -> None:
        """Remember the server; nothing connects until generate()."""
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._key = api_key
        self.model = model
        self.concurrency = max(1, concurrency)
        self.retries = max(0, retries)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()

    def load(self, device: str) -> None:
        """Start the request pool (the concurrency limit)."""
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="llm-http")

    def _session(self) -> Any:
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def payload(self, request: Request) -> dict[str, Any]:
        """Return the chat completion body of one request (temperature 0, the image as a data URI)."""
        user: Any = request.prompt
        if request.image is not None:
            user = [
                {"type": "text", "text": request.prompt},
                {"type": "image_url", "image_url": {"url": data_uri(request.image)}},
            ]
        return {
            "model": self.model,
            "messages": [{"role": "system", "content": request.system}, {"role": "user", "content": user}],
            "max_tokens": request.max_new_tokens,
            "temperature": 0,
        }

    def generate(self, requests: Sequence[Request]) -> list[Reply]:
        """Send every request (at most `concurrency` at once); return one reply each, in order."""
        if self._pool is None:
            self.load("cpu")
        assert self._pool is not None
        return list(self._pool.map(self._one, requests))

    def _one(self, request: Request) -> Reply:
        try:
            return self._post(self.payload(request))
        except RemoteError as exc:
            return Reply(error=str(exc))
        except Exception as exc:  # one prompt's failure must not fail the batch
            log.warning("generation request failed: %s", type(exc).__name__)
            return Reply(error=f"the generation server request failed ({type(exc).__name__}); retry later")

    def _post(self, body: dict[str, Any]) -> Reply:
        import requests

        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, last))
            try:
                response = self._session().post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except requests.Timeout:
                last = f"the generation server at {self.url} did not answer within {self.timeout_s:g} s"
                continue
            except requests.ConnectionError:
                last = f"cannot reach the generation server at {self.url}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"the generation server answered HTTP {response.status_code}"
                self._local.retry_after = response.headers.get("Retry-After", "")
                continue
            if response.status_code >= 400:
                raise RemoteError(
                    f"the generation server refused the request (HTTP {response.status_code}): "
                    f"{self._scrub(response.text[:300])}",
                    retryable=False,
                )
            return self._reply(response)
        raise RemoteError(f"{last} (after {self.retries + 1} tries); retry later", retryable=True)

    def _delay(self, attempt: int, last: str) -> float:
        """Return the wait before another try: Retry-After when the server sent one, else exponential + jitter."""
        hint = str(getattr(self._local, "retry_after", "") or "")
        self._local.retry_after = ""
        try:
            if hint:
                return min(30.0, max(0.0, float(hint)))
        except ValueError:
            pass
        return float(min(30.0, self.backoff_s * 2 ** (attempt - 1)) * (0.75 + 0.5 * random.random()))

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    @staticmethod
    def _reply(response: Any) -> Reply:
        """Return the text of a chat completion, scored by its token log-probabilities when it has them."""
        try:
            choice = response.json()["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RemoteError(
                f"the generation server's answer is not a chat completion ({type(exc).__name__})",
                retryable=True,
            ) from None
        score = 1.0  # servers that send no log-probabilities: the text as answered
        tokens = ((choice.get("logprobs") or {}).get("content") or []) if isinstance(choice, dict) else []
        values = [
            float(t["logprob"])
            for t in tokens
            if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)
        ]
        if values:
            score = math.exp(sum(values) / len(values))
        return Reply(text=str(text).strip(), score=min(1.0, max(0.0, score)))

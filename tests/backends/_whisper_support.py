"""A tiny random Whisper built by the tests: byte-level vocab, Whisper's special and timestamp tokens, no hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LANGUAGES = ("en", "de")
# ids: 256 byte tokens, then Whisper's specials in Whisper's order, then <|0.00|> .. <|30.00|>
EOT = 256
SOT = 257
LANG = {code: 258 + i for i, code in enumerate(LANGUAGES)}
TRANSLATE = 258 + len(LANGUAGES)
TRANSCRIBE = TRANSLATE + 1
NO_TIMESTAMPS = TRANSCRIBE + 4  # after <|startoflm|>, <|startofprev|>, <|nospeech|>
TS_BEGIN = NO_TIMESTAMPS + 1
VOCAB_SIZE = TS_BEGIN + 1501


def ts(seconds: float) -> int:
    """Return the timestamp token for a time in chunk seconds (0.02 s steps)."""
    return TS_BEGIN + round(seconds / 0.02)


def text_ids(text: str) -> list[int]:
    """Return the byte-level ids of an ASCII text (one token per character in this vocab)."""
    return list(text.encode("ascii"))


def build_whisper(folder: Path) -> Path:
    """Save a tiny random multilingual WhisperForConditionalGeneration with its processor into `folder`."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{c}|>" for c in LANGUAGES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens(stamps)
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == TS_BEGIN, tokenizer.convert_tokens_to_ids(
        "<|0.00|>"
    )
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=VOCAB_SIZE,
        num_mel_bins=80,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=EOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        decoder_start_token_id=SOT,
    )
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        bos_token_id=EOT,
        lang_to_id={f"<|{c}|>": i for c, i in LANG.items()},
        task_to_id={"translate": TRANSLATE, "transcribe": TRANSCRIBE},
        no_timestamps_token_id=NO_TIMESTAMPS,
        is_multilingual=True,
        max_initial_timestamp_index=50,
        begin_suppress_tokens=[EOT],
        suppress_tokens=[],
        max_length=448,
    )
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return folder


def plant(backend: Any, answers: list[list[int]]) -> list[dict[str, Any]]:
    """Replace the backend model's generate() by one that returns `answers` in chunk order; record calls."""
    import torch

    calls: list[dict[str, Any]] = []
    queue = list(answers)

    def generate(**kwargs: Any) -> torch.Tensor:
        rows = kwargs["input_features"].shape[0]
        calls.append({"rows": rows, "language": kwargs.get("language")})
        taken, queue[:] = queue[:rows], queue[rows:]
        width = max(len(r) for r in taken) + 1
        out = torch.full((rows, width), EOT, dtype=torch.long)
        for r, ids in enumerate(taken):
            out[r, : len(ids)] = torch.tensor(ids)
        return out

    backend.model.generate = generate
    return calls

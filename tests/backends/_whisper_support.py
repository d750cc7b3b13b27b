"""A tiny random Whisper built by the tests: byte-level vocab, Whisper's special and timestamp tokens, no hub."""

from __future__ import annotations

import itertools
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


def build_whisper(folder: Path, d_model: int = 16, tied: bool = True) -> Path:
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
        d_model=d_model,
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
        tie_word_embeddings=tied,
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


def plant_transcript(folder: Path, text: str, end_s: float, language: str = "en") -> Path:
    """Rewrite a saved tiny Whisper (untied head) so that it transcribes any audio as `text` from 0 s to `end_s`.

    Every attention and MLP output and the decoder's positions are zeroed, so the decoder's state is its
    last token's embedding: a bigram table. The chain's tokens get one-hot embeddings and the head sends
    <|startoftranscript|> to the language, <|transcribe|> to <|0.00|>, that to the text's bytes in turn,
    then <|end_s|> and end of text. The text's bytes must be distinct; d_model must exceed the chain.
    Used where a real server process transcribes (e2e, bench), which no test can hand a planted generate().
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(folder)
    ids = text_ids(text)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{text!r} repeats a byte: a bigram table cannot write it")
    chain = [TRANSCRIBE, ts(0.0), *ids, ts(end_s), EOT]
    nodes = [SOT, *chain[:-1]]
    hidden = model.config.d_model
    if hidden <= len(nodes):
        raise ValueError(f"d_model {hidden} must exceed the chain's {len(nodes)} tokens")
    decoder = model.model.decoder
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if name.endswith(("out_proj.weight", "out_proj.bias", "fc2.weight", "fc2.bias")):
                param.zero_()
        decoder.embed_positions.weight.zero_()
        embed = decoder.embed_tokens.weight
        embed.zero_()
        for k, token in enumerate(nodes):
            embed[token, k] = 1.0
        head = model.proj_out.weight
        head.zero_()
        head[LANG[language], 0] = 10.0  # <|startoftranscript|> -> the language (detection)
        for current, following in itertools.pairwise(chain):
            head[following, nodes.index(current)] = 10.0
    model.save_pretrained(folder)
    return folder

"""Tiny random Qwen2 (text), Qwen3-VL and Qwen2.5-VL (vision) models with a byte-level tokenizer, built locally, and planted answers."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Qwen's chat format (the same markers the real models use), enough for apply_chat_template.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
)
SPECIALS_ALL = (*SPECIALS, "<|video_pad|>")


def build_tokenizer() -> Any:
    """Return a byte-level BPE tokenizer with no merges (every text round-trips) and Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS_ALL))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.padding_side = "left"
    return fast


def build_text_model(folder: Path, hidden: int = 32, tied: bool = True) -> Path:
    """Save a tiny random Qwen2ForCausalLM and its tokenizer into folder; return it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tied,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_qwen25_vl(folder: Path) -> Path:
    """Save a tiny random Qwen2.5-VL model and its processor (small images) into folder; return it."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS_ALL}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_vision_model(folder: Path, hidden: int = 32, tied: bool = True) -> Path:
    """Save a tiny random Qwen3-VL model (the default's architecture) and its processor into folder."""
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS_ALL}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied,
    )
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=128 * 128
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class PlantedAnswers:
    """A logits processor that forces, for each row, the answer whose key appears in that row's prompt.

    `answers` maps a prompt substring to the text the model must produce; a row whose prompt holds no
    key gets `fallback`. It proves which prompt reached which row of one batched generate.
    """

    def __init__(self, tokenizer: Any, answers: Mapping[str, str], fallback: str = "?") -> None:
        """Tokenize every answer once."""
        self.tokenizer = tokenizer
        self.answers = {k: tokenizer.encode(v, add_special_tokens=False) for k, v in answers.items()}
        self.fallback = tokenizer.encode(fallback, add_special_tokens=False)
        self.prompt_len = 0
        self.prompt_ids: Any = None
        self.rows: list[list[int]] = []
        self.prompts: list[str] = []
        self.calls = 0

    def _plan(self, input_ids: Any) -> None:
        self.prompt_len = input_ids.shape[1]
        self.prompt_ids = input_ids.clone()
        self.prompts = [self.tokenizer.decode(row, skip_special_tokens=False) for row in input_ids.tolist()]
        self.rows = []
        for prompt in self.prompts:
            # the longest matching key wins, so "summary of X" beats a key that is a prefix of it
            keys = sorted((k for k in self.answers if k in prompt), key=len, reverse=True)
            self.rows.append(self.answers[keys[0]] if keys else self.fallback)
        self.calls += 1

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Put all mass on the next planted token of each row (then end of sequence)."""
        import torch

        step = input_ids.shape[1] - self.prompt_len
        same = (
            self.prompt_ids is not None
            and step > 0
            and input_ids.shape[0] == self.prompt_ids.shape[0]
            and bool(input_ids[:, : self.prompt_len].equal(self.prompt_ids))
        )
        if not same:  # a new generate call: read its prompts
            self._plan(input_ids)
            step = 0
        forced = torch.full_like(scores, float("-inf"))
        eos = int(self.tokenizer.eos_token_id)
        for row, tokens in enumerate(self.rows):
            token = tokens[step] if step < len(tokens) else eos
            forced[row, token] = 0.0
        return forced


def plant_bigram_answer(folder: Path, answer: str) -> Path:
    """Rewrite a saved tiny model's weights so that it writes `answer` for any prompt, with no logits processor.

    Every attention and MLP output is zeroed, so the last position's state is its own token's embedding:
    the model becomes a bigram table. One-hot embeddings and an untied head send the prompt's final
    newline to the answer's first token, each answer token to the next, the last one to end of sequence.
    The answer's tokens (bytes) must be distinct; the hidden size must exceed the vocabulary.
    Used where a real server process answers (e2e), which no test can hand a logits processor.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    vision = hasattr(config, "vision_config")
    loader = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = loader.from_pretrained(folder)
    tokens = tokenizer.encode(answer, add_special_tokens=False)
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{answer!r} repeats a token: a bigram table cannot write it")
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    chain = [newline, *tokens, int(tokenizer.eos_token_id)]
    embed = model.get_input_embeddings().weight
    vocab, hidden = embed.shape
    if hidden <= vocab:
        raise ValueError(f"hidden size {hidden} must exceed the vocabulary ({vocab})")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) and "visual" not in name:
                param.zero_()
        embed.zero_()
        embed[torch.arange(vocab), torch.arange(vocab)] = 1.0
        head = model.get_output_embeddings().weight
        head.zero_()
        for current, following in itertools.pairwise(chain):
            head[following, current] = 10.0
    model.save_pretrained(folder)
    return folder

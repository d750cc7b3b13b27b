"""A tiny random CLAP and a tiny audio classifier built by the tests (no hub), and planted embeddings.

The CLAP's feature extractor runs at 16 kHz with 10 ms hops (1001 frames of 64 mel bins per 10 s
window, what HTSAT's 256x256 input expects), so the tests' 16 kHz clips need no resampling.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

RATE = 16000


def byte_roberta_tokenizer(folder: Path) -> Any:
    """Return a RobertaTokenizer over single bytes (no merges), saved files under `folder`."""
    from transformers import RobertaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        vocab[chars[b]] = len(vocab)
    vocab["<mask>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def build_clap(folder: Path, fusion: bool = False) -> Path:
    """Save a tiny random ClapModel with its processor (16 kHz, 10 s windows) into `folder`."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    tokenizer = byte_roberta_tokenizer(folder / "_tok")
    torch.manual_seed(0)
    config = ClapConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 80,
            "pad_token_id": 1,
            "projection_dim": 8,
        },
        audio_config={
            "depths": [1, 1],
            "num_attention_heads": [1, 2],
            "hidden_size": 32,
            "patch_embeds_hidden_size": 16,
            "num_mel_bins": 64,
            "spec_size": 256,
            "window_size": 8,
            "projection_dim": 8,
            "enable_fusion": fusion,
        },
        projection_dim=8,
    )
    ClapModel(config).eval().save_pretrained(folder)
    extractor = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=RATE,
        hop_length=160,
        fft_window_size=400,
        max_length_s=10,
        frequency_max=8000,
        truncation="fusion" if fusion else "rand_trunc",
        padding="repeatpad",
    )
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_classifier(folder: Path, id2label: Mapping[int, str], bias: list[float]) -> Path:
    """Save a tiny AST audio classifier whose logits are always `bias` (head weights zeroed: planted)."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(0)
    config = ASTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_mel_bins=32,
        max_length=100,
        id2label={int(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
    )
    model = ASTForAudioClassification(config).eval()
    with torch.no_grad():
        model.classifier.dense.weight.zero_()
        model.classifier.dense.bias.copy_(torch.tensor(bias))
    model.save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=32, max_length=100, sampling_rate=RATE).save_pretrained(folder)
    return folder


def build_diarizer(folder: Path, speakers: int = 2) -> Path:
    """Save a tiny random WavLMForAudioFrameClassification (20 ms frames, `speakers` outputs) with its extractor."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForAudioFrameClassification

    torch.manual_seed(0)
    config = WavLMConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_labels=speakers,
    )
    WavLMForAudioFrameClassification(config).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=RATE, return_attention_mask=True).save_pretrained(folder)
    return folder


def build_nemotron_diarizer(folder: Path) -> Path:
    """Save a tiny random Nemotron3DiarizationForAudioFrameClassification (8 speakers, 10 ms) with its processor."""
    import torch
    import transformers
    from transformers import (
        Nemotron3DiarizationConfig,
        Nemotron3DiarizationForAudioFrameClassification,
        Nemotron3DiarizationProcessor,
    )
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES

    torch.manual_seed(0)
    audio = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_mel_bins": 80,
    }
    config = Nemotron3DiarizationConfig(
        audio_config=audio, head_config={"hidden_size": 16, "audio_hidden_size": 16}
    )
    Nemotron3DiarizationForAudioFrameClassification(config).eval().save_pretrained(folder)
    extractor = getattr(transformers, FEATURE_EXTRACTOR_MAPPING_NAMES["nemotron3_diarization"])()
    Nemotron3DiarizationProcessor(feature_extractor=extractor).save_pretrained(folder)
    return folder


def plant_clap(
    backend: Any, audio: Callable[[np.ndarray], np.ndarray], text: Callable[[str], np.ndarray]
) -> list[int]:
    """Replace the loaded CLAP's encoders: `audio` maps one window's input to a vector, `text` one prompt.

    Returns a list that records the number of windows of each audio encoder call.
    """
    calls: list[int] = []

    def embed_audio(feats: np.ndarray) -> np.ndarray:
        calls.append(int(feats.shape[0]))
        rows = np.stack([audio(f) for f in feats]).astype(np.float64)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    def embed_text(texts: list[str]) -> np.ndarray:
        rows = np.stack([text(t) for t in texts]).astype(np.float64)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    backend._embed_audio = embed_audio
    backend._embed_text = embed_text
    return calls

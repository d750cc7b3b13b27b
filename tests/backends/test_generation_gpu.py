"""Generation on CUDA: the in-process engine loads in bf16 (fp16 without bf16) and answers a planted batch."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def test_bf16_batch_on_cuda(tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from backends._llm_engines import TransformersEngine
    from backends._llm_prompts import Request
    from tests.backends._llm_support import PlantedAnswers, build_text_model, build_vision_model

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    text = TransformersEngine(str(build_text_model(tmp_path / "lm")), vision=False, timeout_s=30.0)
    text.load("cuda")
    assert next(text.model.parameters()).dtype == expected
    text.logits_processors[:] = [PlantedAnswers(text.tokenizer, {"alpha": "One.", "beta": "Two."})]
    replies = text.generate([Request("s", "alpha text"), Request("s", "beta text, longer")])
    assert [r.text for r in replies] == ["One.", "Two."]

    vision = TransformersEngine(str(build_vision_model(tmp_path / "vlm")), vision=True, timeout_s=30.0)
    vision.load("cuda")
    assert next(vision.model.parameters()).dtype == expected
    vision.logits_processors[:] = [PlantedAnswers(vision.tokenizer, {"red": "Red.", "blue": "Blue."})]
    images = [Image.new("RGB", (96, 64), "red"), Image.new("RGB", (64, 96), "blue")]
    replies = vision.generate(
        [Request("s", "the red one", images[0]), Request("s", "the blue one", images[1])]
    )
    assert [r.text for r in replies] == ["Red.", "Blue."]
    assert all(r.score == pytest.approx(1.0, abs=1e-3) for r in replies)

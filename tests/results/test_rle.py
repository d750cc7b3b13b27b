"""Brush RLE: our vectorised encoder is byte-identical to label_studio_sdk's mask2rle and round-trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import base_rle_encode, encode_rle, mask2rle

from serving.results.rle import (
    crop_to_rle,
    crops_to_rle,
    encode_runs,
    encode_runs_many,
    mask_to_rle,
    rle_to_mask,
)


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    """Draw a 2-D uint8 mask from run patterns: few long runs, pixel noise, or a few values."""
    height = draw(st.integers(1, 48))
    width = draw(st.integers(1, 48))
    n = height * width
    pattern = draw(st.sampled_from(["runs", "noise", "binary", "constant"]))
    if pattern == "constant":
        return np.full((height, width), draw(st.integers(0, 255)), dtype=np.uint8)
    if pattern == "noise":
        seed = draw(st.integers(0, 2**32 - 1))
        return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    palette = [0, 255] if pattern == "binary" else draw(st.lists(st.integers(0, 255), min_size=1, max_size=4))
    runs = draw(
        st.lists(st.tuples(st.integers(1, max(1, n // 2)), st.sampled_from(palette)), min_size=1, max_size=24)
    )
    flat = np.concatenate([np.full(length, value, dtype=np.uint8) for length, value in runs])
    # Repeat the pattern to fill the mask (runs then also cross row ends), then cut to size.
    flat = np.tile(flat, n // flat.size + 1)[:n]
    return flat.reshape(height, width)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks())
def test_byte_identical_to_sdk_and_round_trips(mask: np.ndarray) -> None:
    """Any uint8 mask encodes exactly as the SDK does, and the SDK decoder gives the mask back."""
    rle = mask_to_rle(mask)
    assert rle == mask2rle(mask)
    assert all(isinstance(b, int) and 0 <= b <= 255 for b in rle)
    np.testing.assert_array_equal(rle_to_mask(rle, *mask.shape), mask)


@pytest.mark.parametrize(
    "runs",
    [
        [(7, 1)],
        [(1, 1), (2, 2), (3, 9), (4, 17), (5, 256), (6, 257)],
        [(5, 65536)],
        [(5, 65537)],  # a long run whose last 16-bit piece has length 1: still flagged as a series
        [(1, 131072), (0, 131073), (9, 3)],
    ],
)
def test_encode_runs_matches_sdk_encode_rle_on_raw_runs(runs: list[tuple[int, int]]) -> None:
    """Run lengths around every field-width boundary (8, 16, 256, 65536) encode as the SDK does."""
    arr = np.concatenate([np.full(length, value, dtype=np.uint8) for value, length in runs])
    lengths, _, values = base_rle_encode(arr)
    assert encode_runs(values, lengths, arr.size) == encode_rle(arr)


def test_full_hd_mask_with_long_runs_is_identical() -> None:
    """A 1920x1080 mask (runs far longer than 65536 RGBA values) encodes exactly as the SDK does."""
    mask = np.zeros((1080, 1920), dtype=np.uint8)
    mask[300:700, 400:1500] = 255
    mask[900:, :] = 128
    rle = mask_to_rle(mask)
    assert rle == mask2rle(mask)
    np.testing.assert_array_equal(rle_to_mask(rle, 1080, 1920), mask)


def test_bool_and_integer_masks() -> None:
    """A bool mask encodes as 0/255; an int mask with values in 0..255 like the uint8 one."""
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    as_u8 = mask.astype(np.uint8) * 255
    assert mask_to_rle(mask) == mask2rle(as_u8)
    assert mask_to_rle(as_u8.astype(np.int64)) == mask2rle(as_u8)
    # A non-contiguous view encodes its logical (row-major) content.
    big = np.arange(60, dtype=np.uint8).reshape(6, 10)
    view = big[::2, ::3]
    assert mask_to_rle(view) == mask2rle(np.ascontiguousarray(view))


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 2, 3), np.uint8), np.zeros(4, np.uint8), np.full((2, 2), 256, np.int64), np.zeros((2, 2))],
)
def test_rejects_what_label_studio_cannot_show(bad: np.ndarray) -> None:
    """3-D, 1-D, out-of-range and float masks are refused with a clear error."""
    with pytest.raises(ValueError):
        mask_to_rle(bad)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.data(),
)
def test_crop_encoding_equals_the_full_mask(width: int, height: int, data: st.DataObject) -> None:
    """A crop placed anywhere (touching borders too) encodes exactly like the full mask it implies."""
    h = data.draw(st.integers(1, height))
    w = data.draw(st.integers(1, width))
    y0 = data.draw(st.integers(0, height - h))
    x0 = data.draw(st.integers(0, width - w))
    seed = data.draw(st.integers(0, 2**32 - 1))
    crop = np.random.default_rng(seed).choice(np.array([0, 0, 255, 7], dtype=np.uint8), size=(h, w))
    full = np.zeros((height, width), dtype=np.uint8)
    full[y0 : y0 + h, x0 : x0 + w] = crop
    assert crop_to_rle(crop, (x0, y0), (width, height)) == mask_to_rle(full)
    assert crop_to_rle(crop > 0, (x0, y0), (width, height)) == mask_to_rle((full > 0).astype(np.uint8) * 255)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 6), st.data())
def test_many_crops_encoded_together_equal_each_encoded_alone(
    width: int, height: int, count: int, data: st.DataObject
) -> None:
    """crops_to_rle packs all masks of an image in one pass: each RLE is still that mask's own, byte for byte."""
    crops = []
    for _ in range(count):
        h, w = data.draw(st.integers(1, height)), data.draw(st.integers(1, width))
        y0, x0 = data.draw(st.integers(0, height - h)), data.draw(st.integers(0, width - w))
        seed = data.draw(st.integers(0, 2**32 - 1))
        density = data.draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))  # empty, sparse, noisy, solid
        crops.append(((np.random.default_rng(seed).random((h, w)) < density) * np.uint8(255), (x0, y0)))
    together = crops_to_rle(crops, (width, height))
    assert together == [crop_to_rle(crop, offset, (width, height)) for crop, offset in crops]
    for (crop, (x0, y0)), rle in zip(crops, together, strict=True):
        full = np.zeros((height, width), dtype=np.uint8)
        full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        assert rle == mask2rle(full)


def test_many_long_runs_in_one_pass() -> None:
    """Masks whose background runs exceed 65536 RGBA values (split into pieces) pack together correctly."""
    crops = [(np.full((5, 7), 255, np.uint8), (100, 200)), (np.zeros((3, 3), np.uint8), (0, 0))]
    crops.append((np.eye(30, dtype=np.uint8) * 255, (600, 400)))
    for (crop, (x0, y0)), rle in zip(crops, crops_to_rle(crops, (640, 480)), strict=True):
        full = np.zeros((480, 640), dtype=np.uint8)
        full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        assert rle == mask2rle(full)
    assert crops_to_rle([], (640, 480)) == []


def test_crop_outside_the_image_is_refused() -> None:
    """A crop that does not fit its image is an error, not a silently wrong mask."""
    with pytest.raises(ValueError):
        crop_to_rle(np.ones((3, 3), np.uint8), (8, 0), (10, 10))


def test_a_single_change_anywhere_in_the_row_is_found() -> None:
    """Runs are found eight bytes at a time: a change at any offset from a word boundary, or in the tail, counts."""
    for n in (1, 2, 7, 8, 9, 15, 16, 17, 31, 33):
        for at in range(n):
            mask = np.zeros((1, n), dtype=np.uint8)
            mask[0, at:] = 200
            assert mask_to_rle(mask) == mask2rle(mask), (n, at)


@pytest.mark.parametrize("changes", [1, 20, 60, 120, 400, 2000])
def test_sparse_and_dense_changes_take_either_scan_and_agree(changes: int) -> None:
    """A 64x64 mask with few or many value changes (gathered words vs whole byte scan) encodes as the SDK does."""
    rng = np.random.default_rng(changes)
    flat = np.zeros(64 * 64, dtype=np.uint8)
    flat[rng.choice(flat.size, changes, replace=False)] = rng.integers(1, 256, changes, dtype=np.uint8)
    mask = np.maximum.accumulate(flat).reshape(64, 64)  # steps up at each change: long runs between
    assert mask_to_rle(mask) == mask2rle(mask)


def test_noise_over_long_background_packs_its_pieces_apart() -> None:
    """Over 65536 chunks plus long runs split into pieces (packed separately from the big arrays)."""
    mask = np.zeros((360, 1920), dtype=np.uint8)
    mask[:80] = (np.random.default_rng(3).random((80, 1920)) < 0.5) * np.uint8(255)
    rle = mask_to_rle(mask)
    assert rle == mask2rle(mask)
    np.testing.assert_array_equal(rle_to_mask(rle, 360, 1920), mask)


def test_a_mask_without_runs_between_others_keeps_its_place() -> None:
    """encode_runs_many with an empty mask in the middle gives each mask its own stream."""
    first = (np.array([0, 255]), np.array([40, 4]), 44)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), 0)
    last = (np.array([7]), np.array([70000]), 70000)
    assert encode_runs_many([first, empty, last]) == [
        encode_runs(*first),
        encode_runs(*empty),
        encode_runs(*last),
    ]
    assert encode_runs(*empty) == [
        0,
        0,
        0,
        0,
        57,
        27,
        248,
    ]  # the header alone: no values, word size, field sizes
    assert encode_runs(*last) == encode_rle(np.full(70000, 7, np.uint8))


def test_crops_beyond_the_buffer_bound_are_encoded_in_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past _MAX_CROP_BUFFER, crops go in groups (memory stays bounded) and each RLE is unchanged."""
    import serving.results.rle as rle_module

    rng = np.random.default_rng(5)
    crops = []
    for _ in range(7):
        h, w = rng.integers(3, 20, 2)
        y0, x0 = rng.integers(0, 60 - h), rng.integers(0, 80 - w)
        crops.append(((rng.random((h, w)) < 0.4) * np.uint8(255), (int(x0), int(y0))))
    together = crops_to_rle(crops, (80, 60))
    calls: list[int] = []
    original = rle_module.crops_to_rle

    def counting(group, size):  # type: ignore[no-untyped-def]
        calls.append(len(group))
        return original(group, size)

    monkeypatch.setattr(rle_module, "_MAX_CROP_BUFFER", 500)
    monkeypatch.setattr(rle_module, "crops_to_rle", counting)
    assert counting(crops, (80, 60)) == together
    assert calls[0] == 7 and len(calls) > 2 and sum(calls[1:]) == 7


def test_runs_just_under_the_split_with_pieces_pack_once() -> None:
    """Chunks just under _SPLIT_PACK plus long-run pieces that take the count past it are packed exactly once."""
    from serving.results.rle import _SPLIT_PACK

    n_short = _SPLIT_PACK - 3
    values = np.concatenate([np.arange(n_short) % 2 * 255, [255, 0]])  # neighbours always differ
    lengths = np.concatenate([np.full(n_short, 4), [4 * 200_000, 4 * 100_000]])  # two runs of several pieces
    assert n_short % 2 == 1  # the last short run is 0, so the long runs go 255 then 0
    flat = np.repeat(values.astype(np.uint8), lengths // 4)
    assert encode_runs(values, lengths, flat.size * 4) == mask2rle(flat.reshape(1, -1))

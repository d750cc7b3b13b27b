"""Label Studio brush RLE: a vectorised encoder byte-identical to the SDK's mask2rle, and a decoder.

Format (thi-ng rle-pack, as Label Studio's brush tool reads it): a bit stream of
32 bits `num` (values in the RGBA-flattened image, so 4 * height * width), 5 bits word size - 1 (7),
four 4-bit run-length field sizes - 1 (3, 4, 8, 16), then one chunk per run:
`0 00 000 value8` for a single value, else `1 idx len-1 value8` with idx/len width picked by the run
length (<=8: 00/3 bits, <=16: 01/4, <=256: 10/8, longer: 11/16 split in pieces of 65536), and at
least one zero bit of padding up to a whole byte (a full zero byte when already aligned, as the SDK does).
Each mask pixel becomes four equal RGBA values, so every run of the mask is four times longer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

_WORD_BITS = 8
_RLE_SIZES = (3, 4, 8, 16)
_MAX_PIECE = 1 << 16
# Scratch buffers up to this size are kept per thread (a 4K mask needs about 10 MB).
_SCRATCH_MAX_BYTES = 16 * 1024 * 1024
_local = threading.local()
_LEN_BITS = np.asarray(_RLE_SIZES, dtype=np.int64)
_RLE_FIELD = int("".join(f"{size - 1:04b}" for size in _RLE_SIZES), 2)
_HEADER_FIELD_BITS = np.array([32, 5, 16], dtype=np.int64)


def _as_uint8_mask(mask: np.ndarray) -> np.ndarray:
    """Return a C-contiguous uint8 view/copy of a 2-D mask; bool masks become 0/255."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * np.uint8(255)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"mask must be uint8, bool or integer, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("mask values must lie in 0..255")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _scratch(nbytes: int) -> np.ndarray:
    """Return a per-thread reusable byte buffer of at least nbytes (fresh pages cost more than the scan)."""
    if nbytes > _SCRATCH_MAX_BYTES:
        return np.empty(nbytes, dtype=np.uint8)
    buf: np.ndarray | None = getattr(_local, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        _local.buf = buf
    return buf


def _run_ends(flat: np.ndarray) -> np.ndarray:
    """Return the index of the last element of every run of equal values in a 1-D uint8 array."""
    n = flat.size
    # Byte-wise "differs from the next byte", padded to whole 32-bit words so that the few words
    # holding a change are found first: masks are mostly long runs, and scanning 4x fewer
    # elements is what makes this step cheap.
    padded = (n + 3) // 4 * 4
    n_words = padded // 4
    buf = _scratch(padded + n_words)
    change = buf[:padded].view(np.bool_)
    np.not_equal(flat[1:], flat[:-1], out=change[: n - 1])
    change[n - 1 :] = False
    change[n - 1] = True  # the last element always ends a run
    word_hit = buf[padded : padded + n_words].view(np.bool_)
    np.not_equal(change.view(np.uint32), 0, out=word_hit)
    hit_words = np.flatnonzero(word_hit)
    if hit_words.size * 4 > n_words:
        # Changes are dense (noise-like masks): one scan of the byte flags is cheaper than the gather.
        return np.flatnonzero(change[:n])
    rows, cols = np.nonzero(change.reshape(-1, 4)[hit_words])
    return hit_words[rows] * 4 + cols


def _length_tables() -> tuple[np.ndarray, np.ndarray]:
    """Return, for run lengths 0..256 of short runs, the chunk code without its value and its width."""
    lengths = np.arange(257, dtype=np.int64)
    idx = (lengths > 8).astype(np.int64) + (lengths > 16)
    len_bits = _LEN_BITS[idx]
    is_series = (lengths > 1).astype(np.int64)
    codes = (is_series << (len_bits + 10)) | (idx << (len_bits + 8)) | (np.maximum(lengths - 1, 0) << 8)
    return codes, len_bits + 11


def encode_runs(values: np.ndarray, lengths: np.ndarray, num: int) -> list[int]:
    """Encode runs (value, length) of a flat uint8 array of `num` values, exactly as the SDK's encode_rle."""
    return encode_runs_many([(values, lengths, num)])[0]


def encode_runs_many(runs: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> list[list[int]]:
    """Encode several masks' runs (values, lengths, num) in one vectorised pass; one RLE per mask.

    The numpy calls cost the same for 1 or 20 masks, and a Mask R-CNN image has tens of them: each
    mask's fields (header, then one chunk per run) go into one bit stream in which every mask starts
    on a 32-bit word, are packed together, and the bytes are cut back per mask.
    """
    n_masks = len(runs)
    if n_masks == 0:
        return []
    counts = np.fromiter((len(r[0]) for r in runs), dtype=np.int64, count=n_masks)
    values = np.concatenate([np.asarray(r[0], dtype=np.int64) for r in runs])
    lengths = np.concatenate([np.asarray(r[1], dtype=np.int64) for r in runs])
    nums = np.fromiter((r[2] for r in runs), dtype=np.int64, count=n_masks)
    owner = np.repeat(np.arange(n_masks), counts)
    long_run = lengths > 256
    # Runs over 256 are written as 16-bit pieces, every piece flagged as a series (even a last piece
    # of length 1): (L-1) // 65536 full pieces of 65536, then the remainder.
    full = np.maximum(lengths - 1, 0) >> 16
    last_len = lengths - (full << 16)
    short = np.minimum(lengths, 256)
    codes = np.where(long_run, _LONG_PREFIX | ((last_len - 1) << 8), _SHORT_CODE[short]) | values
    nbits = np.where(long_run, _LONG_BITS, _SHORT_BITS[short])
    if full.any():
        pieces = full + 1
        is_last = np.zeros(int(pieces.sum()), dtype=bool)
        is_last[np.cumsum(pieces) - 1] = True
        all_codes = np.empty(is_last.size, dtype=np.int64)
        all_codes[is_last] = codes
        all_codes[~is_last] = np.repeat(_FULL_PIECE | values, full)
        all_bits = np.full(is_last.size, _LONG_BITS, dtype=np.int64)
        all_bits[is_last] = nbits
        codes, nbits, owner = all_codes, all_bits, np.repeat(owner, pieces)
    # Each mask: its 3 header fields, then its chunks.
    per_mask = np.bincount(owner, minlength=n_masks) + 3
    first = np.cumsum(per_mask) - per_mask
    header = np.zeros(int(per_mask.sum()), dtype=bool)
    header[(first[:, None] + np.arange(3)).ravel()] = True
    field_codes = np.empty(header.size, dtype=np.int64)
    field_bits = np.empty(header.size, dtype=np.int64)
    field_codes[header] = np.column_stack(
        [nums, np.full(n_masks, _WORD_BITS - 1), np.full(n_masks, _RLE_FIELD)]
    ).ravel()
    field_bits[header] = np.tile(_HEADER_FIELD_BITS, n_masks)
    field_codes[~header] = codes
    field_bits[~header] = nbits
    field_owner = np.repeat(np.arange(n_masks), per_mask)
    # Bit offsets: inside each mask's stream, then shifted to that mask's word-aligned slot.
    ends = np.cumsum(field_bits)
    mask_start = ends[first] - field_bits[first]
    mask_bits = ends[first + per_mask - 1] - mask_start
    padded = mask_bits + _WORD_BITS - mask_bits % _WORD_BITS  # the SDK always adds 1..8 zero bits
    slot = (padded + 31) // 32 * 32
    base = np.cumsum(slot) - slot
    starts = ends - field_bits - mask_start[field_owner] + base[field_owner]
    stream = _pack(field_codes, field_bits, starts, int(slot.sum()) // 32)
    return [
        list(stream[b : b + p]) for b, p in zip((base // 8).tolist(), (padded // 8).tolist(), strict=True)
    ]


def _pack(codes: np.ndarray, nbits: np.ndarray, starts: np.ndarray, n_words: int) -> bytes:
    """Write each field (`nbits` wide, at most 32) MSB-first at its bit offset; return the bytes."""
    ends = starts + nbits
    word_idx = starts >> 5
    # Place each field left-aligned at its bit offset inside a 64-bit window over two 32-bit words.
    window = codes.astype(np.uint64) << (64 - ends + (word_idx << 5)).astype(np.uint64)
    # Fields never overlap, so summing (exact in float64 below 2**53) is the same as OR-ing.
    words = np.bincount(word_idx, weights=(window >> _U32).astype(np.float64), minlength=n_words + 2)
    words[1:] += np.bincount(word_idx, weights=(window & _LOW32).astype(np.float64), minlength=n_words + 2)[
        :-1
    ]
    return words[:n_words].astype(">u4").tobytes()


def _header(num: int) -> np.ndarray:
    """Return the header fields: value count, word size - 1, the four run-length field sizes - 1."""
    return np.array([num, _WORD_BITS - 1, _RLE_FIELD], dtype=np.int64)


_SHORT_CODE, _SHORT_BITS = _length_tables()
# A piece of a long run: series flag 1, field index 3 (16-bit length), then length - 1 and the value.
_LONG_PREFIX = (1 << 26) | (3 << 24)
_LONG_BITS = 27
_FULL_PIECE = _LONG_PREFIX | (0xFFFF << 8)
_U32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (uint8 0..255, or bool as 0/255) as Label Studio brush RLE bytes.

    Byte-identical to label_studio_sdk.converter.brush.mask2rle, without building the 4x RGBA array.
    """
    arr = _as_uint8_mask(mask)
    flat = arr.ravel()
    if flat.size == 0:
        return encode_runs(np.empty(0, np.int64), np.empty(0, np.int64), 0)
    ends = _run_ends(flat)
    lengths = np.diff(ends, prepend=-1) * 4
    return encode_runs(flat[ends], lengths, flat.size * 4)


def crop_to_rle(crop: np.ndarray, offset_xy: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """Encode a mask given as a crop placed at offset_xy in an otherwise empty (width, height) image.

    Byte-identical to mask_to_rle of the full mask, at the cost of the crop: the runs outside the
    crop are known (background), so only the crop's rows, extended by one background pixel on each
    side, and the row junctions are scanned.
    """
    return crops_to_rle([(crop, offset_xy)], size)[0]


def crops_to_rle(
    crops: Sequence[tuple[np.ndarray, tuple[int, int]]], size: tuple[int, int]
) -> list[list[int]]:
    """Encode several (crop, offset_xy) masks of one (width, height) image; one RLE each, packed together."""
    width, height = size
    if width * height == 0:
        return [[] for _ in crops]
    return encode_runs_many([_crop_runs(crop, offset_xy, size) for crop, offset_xy in crops])


def _crop_runs(
    crop: np.ndarray, offset_xy: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return the runs (values, RGBA lengths, RGBA count) of a crop placed in an empty image."""
    arr = _as_uint8_mask(crop)
    width, height = size
    x0, y0 = offset_xy
    h, w = arr.shape
    n = width * height
    if h == 0 or w == 0 or not arr.any():
        return np.zeros(1, dtype=np.int64), np.array([n * 4], dtype=np.int64), n * 4
    if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
        raise ValueError(f"crop {w}x{h} at {offset_xy} does not fit a {width}x{height} image")
    # Row segments [a, b) of the full image: the crop plus its background neighbours.
    a, b = max(0, x0 - 1), min(width, x0 + w + 1)
    seg = b - a
    ext = np.zeros((h, seg), dtype=np.uint8)
    ext[:, x0 - a : x0 - a + w] = arr
    # Changes inside each row segment (a change at a segment's last pixel is a row junction: not here).
    q = _run_ends(ext.ravel())
    q = q[q % seg != seg - 1]
    rows, cols = np.divmod(q, seg)
    inner = (y0 + rows) * width + a + cols
    # Junctions between the last pixel of row y-1 and the first of row y, for the rows around the crop.
    ys = np.arange(max(1, y0), min(height - 1, y0 + h) + 1, dtype=np.int64)
    last = np.zeros(ys.size, dtype=np.uint8)
    first = np.zeros(ys.size, dtype=np.uint8)
    if x0 + w == width:
        inside = (ys - 1 >= y0) & (ys - 1 < y0 + h)
        last[inside] = arr[ys[inside] - 1 - y0, -1]
    if x0 == 0:
        inside = (ys >= y0) & (ys < y0 + h)
        first[inside] = arr[ys[inside] - y0, 0]
    junctions = ys[last != first] * width - 1
    ends = np.concatenate([np.sort(np.concatenate([inner, junctions])), np.array([n - 1], dtype=np.int64)])
    # The value at each run end: the crop's where it lies inside the crop, else background.
    ry, rx = np.divmod(ends, width)
    values = np.zeros(ends.size, dtype=np.int64)
    inside = (ry >= y0) & (ry < y0 + h) & (rx >= x0) & (rx < x0 + w)
    values[inside] = arr[ry[inside] - y0, rx[inside] - x0]
    return values, np.diff(ends, prepend=-1) * 4, n * 4


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE to a (height, width) uint8 mask (the alpha channel), via the SDK."""
    from label_studio_sdk.converter.brush import decode_rle

    flat = decode_rle(rle)
    return np.reshape(flat, (height, width, 4))[:, :, 3]

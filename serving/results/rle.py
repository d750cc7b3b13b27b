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
# Scratch buffers up to this size are kept per thread (a 4K mask needs about 10 MB).
_SCRATCH_MAX_BYTES = 16 * 1024 * 1024
_local = threading.local()
# Crops encoded together share one buffer of at most about this many bytes (a single larger crop
# still goes alone).
_MAX_CROP_BUFFER = 32 * 1024 * 1024
# Past one changed word in this many, a byte-wise scan of the whole mask beats gathering the words
# (measured: the gather wins up to about 40-60% of the words changed).
_DENSE_WORDS = 2
_LEN_BITS = np.asarray(_RLE_SIZES, dtype=np.int64)
_RLE_FIELD = int("".join(f"{size - 1:04b}" for size in _RLE_SIZES), 2)


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
    n_words = (n - 1) // 8
    # Compare the array with itself shifted by one byte, eight bytes per uint64: word k differs when a
    # run ends at one of the bytes 8k..8k+7. Masks are mostly long runs, so one pass over 8x fewer
    # elements finds the few words worth a byte-wise look.
    after = flat[1 : 1 + n_words * 8].view(np.uint64)
    before = flat[: n_words * 8].view(np.uint64)
    buf = _scratch(n_words + n).view(np.bool_)
    differs = buf[:n_words]
    np.not_equal(after, before, out=differs)
    hit = np.flatnonzero(differs)
    if hit.size * _DENSE_WORDS > n_words:
        # Changes are dense (noise-like masks): one byte-wise scan is cheaper than the gather.
        change = buf[n_words : n_words + n]
        np.not_equal(flat[1:], flat[:-1], out=change[:-1])
        change[-1] = True  # the last element always ends a run
        return np.flatnonzero(change)
    # Byte offsets inside the changed words, then the bytes after the last whole word.
    at = np.flatnonzero(after[hit].view(np.uint8) != before[hit].view(np.uint8))
    tail = n_words * 8
    return np.concatenate(
        [hit[at >> 3] * 8 + (at & 7), np.flatnonzero(flat[tail + 1 :] != flat[tail:-1]) + tail, [n - 1]]
    )


def _run_lengths(ends: np.ndarray) -> np.ndarray:
    """Return the RGBA length of each run (four values per pixel) from the run ends."""
    lengths = np.empty_like(ends)
    if ends.size:
        lengths[0] = ends[0] + 1
        np.subtract(ends[1:], ends[:-1], out=lengths[1:])
        lengths <<= 2
    return lengths


def encode_runs(values: np.ndarray, lengths: np.ndarray, num: int) -> list[int]:
    """Encode runs (value, length) of a flat uint8 array of `num` values, exactly as the SDK's encode_rle."""
    return encode_runs_many([(values, lengths, num)])[0]


def encode_runs_many(runs: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> list[list[int]]:
    """Encode several masks' runs (values, lengths, num) in one vectorised pass; one RLE per mask."""
    if not runs:
        return []
    if len(runs) == 1:
        values, lengths = np.asarray(runs[0][0]), np.asarray(runs[0][1], dtype=np.int64)
    else:
        values = np.concatenate([np.asarray(r[0], dtype=np.int64) for r in runs])
        lengths = np.concatenate([np.asarray(r[1], dtype=np.int64) for r in runs])
    counts = np.fromiter((len(r[0]) for r in runs), dtype=np.int64, count=len(runs))
    nums = np.fromiter((r[2] for r in runs), dtype=np.int64, count=len(runs))
    return _encode(values, lengths, counts, nums)


def _encode(values: np.ndarray, lengths: np.ndarray, counts: np.ndarray, nums: np.ndarray) -> list[list[int]]:
    """Encode the runs of several masks, concatenated (`counts` runs each), as one RLE per mask.

    The numpy calls cost the same for 1 or 20 masks, and a Mask R-CNN image has tens of them: every
    mask's stream (header, then one chunk per run) starts on a 32-bit word of one shared stream, the
    fields are packed together, and the bytes are cut back per mask.
    """
    n_masks = counts.size
    # One chunk per run from the tables; runs over 256 get the 16-bit length field. Noise-like masks
    # have millions of runs, so the steps below work in place where they can.
    index = np.minimum(lengths, _LONG)
    codes = _CODE[index]
    codes |= values
    nbits = _BITS[index]
    long_runs = np.flatnonzero(index == _LONG)
    del index
    # A long run is written as (L-1) // 65536 full pieces of 65536, then the remainder, every piece
    # flagged as a series (even a last piece of length 1). The full pieces come first.
    long_len = lengths[long_runs]
    full = (long_len - 1) >> 16
    codes[long_runs] |= (long_len - (full << 16) - 1) << 8
    nbits[long_runs] += full * _LONG_BITS
    # Bit offsets of the chunks inside their mask's stream (after the header), then in the shared one.
    starts = np.cumsum(nbits)
    if n_masks == 1:
        mask_end = starts[-1:] if starts.size else np.zeros(1, dtype=np.int64)
        before = np.zeros(1, dtype=np.int64)
    else:
        bounds = np.cumsum(counts)
        # starts is still the running end: a mask ends where its last run does (or, without runs,
        # where the previous mask did).
        mask_end = starts[bounds - 1] if starts.size else np.zeros(n_masks, dtype=np.int64)
        mask_end[bounds == 0] = 0
        before = np.zeros(n_masks, dtype=np.int64)
        before[1:] = mask_end[:-1]
    mask_bits = mask_end - before + _HEADER_BITS
    starts -= nbits
    padded = mask_bits + _WORD_BITS - mask_bits % _WORD_BITS  # the SDK always adds 1..8 zero bits
    slot = (padded + 31) // 32 * 32
    base = np.cumsum(slot) - slot
    shift = base + _HEADER_BITS - before
    starts += shift[0] if n_masks == 1 else np.repeat(shift, counts)
    # The last piece of a long run follows its full pieces.
    has_full = np.flatnonzero(full)
    pieces_apart = False
    if has_full.size:
        per_run = full[has_full]
        # Pieces are 27 bits each, back to back: the k-th piece overall, less the pieces of earlier runs.
        group_start = np.cumsum(per_run) - per_run
        piece_starts = np.repeat(starts[long_runs[has_full]] - _LONG_BITS * group_start, per_run)
        piece_starts += _LONG_BITS * np.arange(piece_starts.size)
        piece_codes = np.repeat(_FULL_PIECE | values[long_runs[has_full]].astype(np.int64), per_run)
        starts[long_runs] += full * _LONG_BITS
        nbits[long_runs] -= full * _LONG_BITS
        pieces_apart = codes.size >= _SPLIT_PACK
        if not pieces_apart:
            codes = np.concatenate([codes, piece_codes])
            nbits = np.concatenate([nbits, np.full(piece_starts.size, _LONG_BITS, dtype=np.int64)])
            starts = np.concatenate([starts, piece_starts])
    n_words = int(slot.sum()) // 32
    words = _pack(codes, nbits, starts, n_words)
    if pieces_apart:
        # Big arrays are not copied to append the few pieces: those are packed on their own.
        words += _pack(
            piece_codes, np.full(piece_starts.size, _LONG_BITS, dtype=np.int64), piece_starts, n_words
        )
    # The header sits at the start of each mask's slot: the value count fills the first 32-bit word,
    # the word size and run-length field sizes (21 bits) open the second.
    first_word = base // 32
    words[first_word] += nums.astype(np.uint64)
    words[first_word + 1] += _HEADER_REST
    stream = words[:n_words].astype(">u4").tobytes()
    return [
        list(stream[b : b + p]) for b, p in zip((base // 8).tolist(), (padded // 8).tolist(), strict=True)
    ]


def _pack(codes: np.ndarray, nbits: np.ndarray, starts: np.ndarray, n_words: int) -> np.ndarray:
    """Return 32-bit words (in uint64) holding each field (`nbits` wide, at most 32) MSB-first at its bit offset.

    Consumes `codes`: it is shifted in place.
    """
    word_idx = starts >> 5
    # Place each field left-aligned at its bit offset inside a 64-bit window over two 32-bit words.
    shift = starts & 31
    shift += nbits
    np.subtract(64, shift, out=shift)
    window = codes.view(np.uint64)
    np.left_shift(window, shift.view(np.uint64), out=window)
    del shift
    # Fields never overlap, so adding is the same as OR-ing; np.add.at on contiguous uint64 is
    # numpy's fast scatter (np.bitwise_or.at and float bincount were 3x slower).
    words = np.zeros(n_words + 2, dtype=np.uint64)
    np.add.at(words, word_idx, window >> _U32)
    window &= _LOW32
    np.add.at(words[1:], word_idx, window)
    return words


def _length_tables() -> tuple[np.ndarray, np.ndarray]:
    """Return, by run length 0..256 (and 257 for any longer run), the chunk code without its value and its width."""
    lengths = np.arange(_LONG + 1, dtype=np.int64)
    idx = (lengths > 8).astype(np.int64) + (lengths > 16) + (lengths > 256)
    len_bits = _LEN_BITS[idx]
    is_series = (lengths > 1).astype(np.int64)
    codes = (is_series << (len_bits + 10)) | (idx << (len_bits + 8)) | (np.maximum(lengths - 1, 0) << 8)
    # A long run's length field is filled in per run.
    codes[_LONG] = (1 << 26) | (3 << 24)
    return codes, len_bits + 11


# Index of "longer than 256" in the chunk tables.
_LONG = 257
_CODE, _BITS = _length_tables()
# A piece of a long run: series flag 1, field index 3 (16-bit length), then length - 1 and the value.
_LONG_BITS = 27
_FULL_PIECE = int(_CODE[_LONG]) | (0xFFFF << 8)
_HEADER_BITS = 32 + 5 + 16
# Word size - 1 (5 bits), then the run-length field sizes (16 bits), left-aligned in a 32-bit word.
_HEADER_REST = np.uint64(((_WORD_BITS - 1) << 16 | _RLE_FIELD) << (32 - 21))
# Below this many chunks, appending the long runs' pieces costs less than packing them apart.
_SPLIT_PACK = 1 << 16
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
    return encode_runs(flat[ends], _run_lengths(ends), flat.size * 4)


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
    """Encode several (crop, offset_xy) masks of one (width, height) image; one RLE each.

    All crops are scanned and packed together: a Mask R-CNN image has tens of masks, and per-mask numpy
    calls, not pixels, were the cost. Each crop's rows, extended by one background pixel on each side,
    go into one buffer; the runs outside those segments are background, except at row junctions
    where a crop touches the image's left or right edge.
    """
    width, height = size
    if width * height == 0:
        return [[] for _ in crops]
    if not crops:
        return []
    # Bound the shared buffer: a 4K image with a hundred large objects would otherwise need
    # gigabytes at once. Groups of crops are encoded one after the other.
    areas = [_buffer_area(np.shape(crop)) for crop, _ in crops]
    if len(crops) > 1 and sum(areas) > _MAX_CROP_BUFFER:
        out: list[list[int]] = []
        group_start, group_area = 0, 0
        for k, area in enumerate(areas):
            if k > group_start and group_area + area > _MAX_CROP_BUFFER:
                out.extend(crops_to_rle(crops[group_start:k], size))
                group_start, group_area = k, 0
            group_area += area
        out.extend(crops_to_rle(crops[group_start:], size))
        return out
    arrays, geometry, buffer = _pack_crops(crops, size)
    owner, positions, values = _segment_changes(buffer, geometry, width)
    extra = _junctions(arrays, geometry, size)
    n, n_crops = width * height, len(crops)
    x0s, y0s, hs, ws = geometry[:, :4].T
    final_val = np.zeros(n_crops, dtype=np.int64)
    corner = (x0s + ws == width) & (y0s + hs == height) & (hs > 0) & (ws > 0)
    for k in np.flatnonzero(corner).tolist():
        final_val[k] = arrays[k][-1, -1]
    if extra:
        # Junctions break the (crop, position) order: sort it back.
        owner = np.concatenate([owner, *(e[0] for e in extra), np.arange(n_crops)])
        positions = np.concatenate(
            [positions, *(e[1] for e in extra), np.full(n_crops, n - 1, dtype=np.int64)]
        )
        values = np.concatenate([values, *(e[2] for e in extra), final_val])
        order = np.lexsort((positions, owner))
        owner, positions, values = owner[order], positions[order], values[order]
    else:
        # Each crop's image-wide last pixel closes its list of run ends.
        at = np.searchsorted(owner, np.arange(n_crops), side="right")
        owner = np.insert(owner, at, np.arange(n_crops))
        positions = np.insert(positions, at, n - 1)
        values = np.insert(values, at, final_val)
    counts = np.bincount(owner, minlength=n_crops)
    lengths = np.empty_like(positions)
    lengths[1:] = positions[1:] - positions[:-1]
    first_run = np.cumsum(counts) - counts
    lengths[first_run] = positions[first_run] + 1
    lengths <<= 2
    return _encode(values, lengths, counts, np.full(n_crops, n * 4, dtype=np.int64))


def _pack_crops(
    crops: Sequence[tuple[np.ndarray, tuple[int, int]]], size: tuple[int, int]
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Return the crops as uint8 masks, their geometry rows and the one buffer holding every crop's row segments.

    Per crop: x0, y0, h, w, the segment start a and width, and where its rows start in the buffer.
    """
    width, height = size
    arrays: list[np.ndarray] = []
    geometry = np.zeros((len(crops), 7), dtype=np.int64)
    total = 0
    for k, (crop, (x0, y0)) in enumerate(crops):
        arr = _as_uint8_mask(crop)
        h, w = arr.shape
        if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height:
            if arr.any():
                raise ValueError(f"crop {w}x{h} at {(x0, y0)} does not fit a {width}x{height} image")
            h = w = 0  # an empty crop is background wherever it was placed
        a = max(0, x0 - 1)
        seg = min(width, x0 + w + 1) - a if h and w else 1
        geometry[k] = (x0, y0, h, w, a, seg, total)
        arrays.append(arr)
        total += h * seg if w else 0
    buffer = np.zeros(total, dtype=np.uint8)
    for k, arr in enumerate(arrays):
        x0, _, h, w, a, seg, offset = geometry[k].tolist()
        if h and w:
            buffer[offset : offset + h * seg].reshape(h, seg)[:, x0 - a : x0 - a + w] = arr
    return arrays, geometry, buffer


def _segment_changes(buffer: np.ndarray, geometry: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
    """Return (crop, image position, new value) of each change inside a row segment of the packed buffer.

    A change at a segment's last pixel is a row junction: not counted here (see _junctions).
    """
    _, y0s, _, _, segs_a, segs, offsets = geometry.T
    q = _run_ends(buffer) if buffer.size else np.empty(0, dtype=np.int64)
    owner = np.searchsorted(offsets, q, side="right") - 1
    seg_q = segs[owner]
    rows, cols = np.divmod(q - offsets[owner], seg_q)
    inside_segment = cols != seg_q - 1
    owner, q = owner[inside_segment], q[inside_segment]
    positions = (y0s[owner] + rows[inside_segment]) * width + segs_a[owner] + cols[inside_segment]
    return owner, positions, buffer[q].astype(np.int64)


def _junctions(
    arrays: list[np.ndarray], geometry: np.ndarray, size: tuple[int, int]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Return (crop, position, value) of the row junctions of crops that touch the image's left or right edge.

    Few values per crop, read straight from the crops.
    """
    width, height = size
    extra = []
    for k, arr in enumerate(arrays):
        x0, y0, h, w = geometry[k, :4].tolist()
        if not (h and w) or not (x0 == 0 or x0 + w == width):
            continue
        ys = np.arange(max(1, y0), min(height - 1, y0 + h) + 1, dtype=np.int64)
        last = np.zeros(ys.size, dtype=np.int64)  # the pixel ending row y-1
        first = np.zeros(ys.size, dtype=np.int64)  # the pixel opening row y
        if x0 + w == width:
            ok = (ys - 1 >= y0) & (ys - 1 < y0 + h)
            last[ok] = arr[ys[ok] - 1 - y0, -1]
        if x0 == 0:
            ok = (ys >= y0) & (ys < y0 + h)
            first[ok] = arr[ys[ok] - y0, 0]
        differ = last != first
        extra.append((np.full(int(differ.sum()), k, dtype=np.int64), ys[differ] * width - 1, last[differ]))
    return extra


def _buffer_area(shape: tuple[int, ...]) -> int:
    """Return the bytes a crop of this shape takes in the shared buffer (0 for a shape refused later)."""
    return shape[0] * (shape[1] + 2) if len(shape) == 2 else 0


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE to a (height, width) uint8 mask (the alpha channel), via the SDK."""
    from label_studio_sdk.converter.brush import decode_rle

    flat = decode_rle(rle)
    return np.reshape(flat, (height, width, 4))[:, :, 3]

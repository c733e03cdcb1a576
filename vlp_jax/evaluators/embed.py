"""Running a jitted function over a whole host-side array in fixed-size batches.

Every call sees exactly `batch_size` rows: the last, ragged batch is padded by repeating its
final row (not zeros, so a normalising encoder never sees a 0/0 row), and the padded rows
are dropped from the result. A jitted `fn` is therefore traced and compiled once per input
shape, however many rows the array has.

All batches are dispatched before any result is read back, so device work overlaps host
slicing and transfers (JAX dispatch is asynchronous).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """x [n, ...] -> [size, ...] by repeating the last row (size >= n >= 1)."""
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)


def map_in_batches(fn: Callable[..., Any], arrays: Sequence[np.ndarray],
                   batch_size: int) -> np.ndarray:
    """fn(*batch) over aligned rows of `arrays`, concatenated along axis 0.

    Args:
      fn: (a_1 [batch_size, ...], ..., a_k [batch_size, ...]) -> out [batch_size, ...].
      arrays: k arrays with the same leading size N >= 1 (e.g. (images, tokens) for a
        pairwise match score).
      batch_size: rows per call; every call gets exactly this many.

    Returns:
      numpy out [N, ...] (padding rows removed), in the dtype `fn` returned.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("map_in_batches needs at least one input array")
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"inputs disagree on the number of rows: {[a.shape for a in arrays]}")
    if n == 0:
        raise ValueError("cannot run an evaluator's encoder over an empty array")
    pending = []
    for start in range(0, n, batch_size):
        chunk = [_pad_rows(a[start:start + batch_size], batch_size) for a in arrays]
        pending.append((fn(*chunk), min(batch_size, n - start)))
    return np.concatenate([np.asarray(out)[:size] for out, size in pending], axis=0)


def embed_in_batches(fn: Callable[[Any], Any], array: np.ndarray,
                     batch_size: int) -> np.ndarray:
    """Embeddings of every row of `array` with a jitted encoder.

    Args:
      fn: x [batch_size, ...] -> embeddings [batch_size, D] (e.g. `predict["encode_image"]`).
      array: [N, ...] inputs (images [N, H, W, 3] or tokens [N, L]), N >= 1.
      batch_size: rows per call; the last batch is padded so `fn` sees one shape only.

    Returns:
      float32 numpy [N, D].
    """
    out = map_in_batches(fn, (array,), batch_size)
    if out.ndim != 2:
        raise ValueError(f"an embedding function must return [batch, D]; the concatenated "
                         f"output has shape {out.shape}")
    return out.astype(np.float32, copy=False)

"""The packing contract between the data loader and the attention kernels.

A flat micro-batch of T tokens holds whole documents back to back (doc ids 0, 1, 2... in order) and
then padding (doc id -1) up to T. FlashAttention's variable-length kernels take the segment offsets
as a tensor of a fixed size, so shapes stay static under torch.compile; two numbers fix that size:

* `max_docs(T)`: the most documents one batch may hold (the loaders close a batch there);
* `pad_segments(T, bound)`: how many segments the trailing padding is cut into, so that no segment is
  longer than the kernel's bound on a segment's length (a longer one would come back unwritten:
  uninitialised outputs and gradients, issue 15);
* `segment_bound(T, max_length, crop)`: that bound. Cropped training documents (data.crop=true) are at
  most data.max_length long; whole ones (data.crop=false, the reference's way) are cut only past
  WHOLE_FACTOR x data.max_length (and the micro-batch), so the sliding window limits their attention.
"""
from __future__ import annotations


def max_docs(tokens_per_batch: int) -> int:
    """The most documents one packed batch may hold: T // 64 (at least 8). Real protein data almost
    never reaches it (documents averaging < 64 tokens); when a batch does, it is closed early."""
    return max(8, tokens_per_batch // 64)


def pad_segments(tokens_per_batch: int, bound: int) -> int:
    """Segments of at most `bound` tokens that any amount of trailing padding (< T tokens) fits in."""
    return -(-tokens_per_batch // max(1, bound))


WHOLE_FACTOR = 8  # whole documents (data.crop=false) longer than this many crops are cut into pieces


def segment_bound(tokens_per_batch: int, max_length: int, crop: bool) -> int:
    """The longest segment a training batch may hold (see the module docstring)."""
    return max_length if crop else min(tokens_per_batch, WHOLE_FACTOR * max_length)

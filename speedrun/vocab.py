"""The ESM-2 33-token vocabulary, framing and a fast byte-level encoder.

Ids and order are exactly those of the HF `EsmTokenizer` of `facebook/esm2_t6_8M_UR50D` (RECIPE.md §1),
so shards written by the reference tokenizer and ours are interchangeable.

Encoding follows that tokenizer's behaviour: white space is dropped; every vocabulary letter is one
token; `-` and `.` are gap tokens; a *run* of characters outside the vocabulary (lower-case letters, a
trailing `*`, digits...) becomes one `<unk>` (the HF tokenizer hands such a run to `str.split()`, which
keeps it as one word), and white space ends a run. Each protein is framed as `<cls> residues <eos>`.
"""
from __future__ import annotations

import numpy as np

TOKENS = [
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
]
VOCAB_SIZE = len(TOKENS)  # 33
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32
AA_FIRST, AA_LAST = 4, 23  # the 20 canonical amino acids are ids 4..23
SPECIAL_IDS = (CLS, PAD, EOS, UNK, 31, MASK)
TOKEN_TO_ID = {t: i for i, t in enumerate(TOKENS)}
LETTERS = "".join(t for t in TOKENS if len(t) == 1)  # residue and gap letters the vocab knows

_WS, _UNKRUN = 254, 255
_LUT = np.full(256, _UNKRUN, dtype=np.uint8)
for _i, _t in enumerate(TOKENS):
    if len(_t) == 1:
        _LUT[ord(_t)] = _i
for _c in b" \t\r\n\x0b\x0c":
    _LUT[_c] = _WS

_DECODE = np.array([t if len(t) == 1 else "" for t in TOKENS], dtype=object)


def encode_residues(seq: str | bytes) -> np.ndarray:
    """Residue ids (uint8) of one sequence, without framing. See the module docstring for the rules."""
    raw = np.frombuffer(seq.encode("latin-1") if isinstance(seq, str) else seq, dtype=np.uint8)
    ids = _LUT[raw]
    if ids.size and (ids == _UNKRUN).any():
        run_start = np.ones(ids.size, dtype=bool)
        run_start[1:] = ids[1:] != ids[:-1]
        ids = ids[(ids != _UNKRUN) | run_start]
        ids[ids == _UNKRUN] = UNK
    return ids[ids != _WS]


def encode(seq: str | bytes, max_length: int | None = None) -> np.ndarray:
    """`<cls> residues <eos>` as uint8 ids; with max_length, truncated to that many tokens (eos kept)."""
    res = encode_residues(seq)
    if max_length is not None and res.size + 2 > max_length:
        res = res[: max(max_length - 2, 0)]
    out = np.empty(res.size + 2, dtype=np.uint8)
    out[0], out[1:-1], out[-1] = CLS, res, EOS
    return out


def decode(ids, keep_special: bool = False) -> str:
    """Letters of a token-id sequence; special tokens are dropped (or shown as <tok> with keep_special)."""
    ids = np.asarray(ids, dtype=np.int64)
    if keep_special:
        return "".join(TOKENS[i] for i in ids)
    return "".join(_DECODE[ids])

"""Embeddings from a trained protein LM: per-residue or pooled hidden states of any layer.

    from speedrun.embed import embed
    X = embed(model, ["MKTAYIAK...", "MSDNE..."], layer=-1, pool="mean")         # (N, d) float32
    per_layer = embed(model, seqs, layer="all")                                  # {0: (N, d), ..., L: (N, d)}
    residues = embed(model, seqs, layer=6, pool="none")                          # [(L_i, d), ...]

`speedrun.embed(...)` (the module is callable) and `model.embed(sequences, ...)` on a model from
`speedrun.load(...)` are the same function.

Layers: 0 is the normed input embedding (`model.embed_tokens`, what every block receives as x0);
k in 1..n_layers is the output of block k (the residual stream, before the final norm); negative k
counts from the end like Python indexing over 0..n_layers, so -1 is the last block. `layer` is an
int, a list of ints, or "all" (0..n_layers); a list or "all" returns a dict keyed by the layers as
given.

Pooling: "mean" averages over the residues (`<cls>` and `<eos>` excluded), "cls" takes the `<cls>`
position, "none" returns each sequence's per-residue states (L_i, d), residues only.

Batching packs exactly as training does: each sequence is encoded as `<cls> residues <eos>`
(`speedrun.vocab.encode`), sequences are placed back to back into flat streams of at most
`batch_tokens` tokens with `doc_ids` 0, 1, 2... and -1 on the `<pad>` tail (padded to exactly `batch_tokens`
with FlexAttention, which is compiled per shape; to a multiple of 128 with SDPA), and attention never crosses documents — so a sequence's embedding does not
depend on what else shares its batch (up to float rounding). Sequences are sorted by length (longest
first) to fill streams evenly; results come back in input order. A sequence longer than `max_length`
tokens is split into the fewest consecutive pieces of at most `max_length` tokens, of near-equal size,
as the evaluation split is (only the first piece holds `<cls>`, only the last `<eos>`); the pieces'
per-residue states are concatenated before pooling. Attention is full within a piece (window =
`max_length`).

The model runs in eval mode under `torch.no_grad()` (its previous mode is restored); activations use
`dtype` (fp32 weights are cast at call time, as in training). Results are float32 tensors on the CPU.
`device=None` uses the model's device; another device moves the model there (and leaves it there).
"""
from __future__ import annotations

import sys
import types
from typing import Iterable, Sequence, Union

import numpy as np
import torch

from .vocab import PAD, encode

Layer = Union[int, Sequence[int], str]
POOLS = ("mean", "cls", "none")
_PAD_TO = 128


def _resolve_layers(layer: Layer, n_layers: int) -> tuple[list, list[int], bool]:
    """(keys as given, absolute indices in 0..n_layers, single?)."""
    if isinstance(layer, str):
        if layer != "all":
            raise ValueError(f"layer={layer!r}: use an int, a list of ints or 'all'")
        keys = list(range(n_layers + 1))
        single = False
    elif isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        keys, single = [int(layer)], True
    else:
        keys, single = [int(k) for k in layer], False
        if not keys:
            raise ValueError("layer=[]: ask for at least one layer")
    absolute = []
    for k in keys:
        a = k if k >= 0 else n_layers + 1 + k
        if not 0 <= a <= n_layers:
            raise ValueError(f"layer={k} is out of range for a model with {n_layers} blocks "
                             f"(use 0..{n_layers} or -{n_layers + 1}..-1)")
        absolute.append(a)
    return keys, absolute, single


def _pieces(ids: np.ndarray, max_length: int) -> list[tuple[int, int]]:
    """Split a framed sequence of n tokens into the fewest near-equal consecutive (start, end) pieces."""
    n = ids.size
    k = max(1, -(-n // max_length))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def embed(model, sequences: Union[str, Iterable[str]], *, layer: Layer = -1, pool: str = "mean",
          batch_tokens: int = 16384, max_length: int = 1024, device=None,
          dtype: torch.dtype = torch.float32):
    """Embeddings of `sequences` (amino-acid strings) from `model` (a `speedrun.model.ProteinLM`).

    Returns, for one layer: a (N, d) float32 tensor ("mean"/"cls") or a list of N (L_i, d) tensors
    ("none"); for a list of layers or "all": a dict {layer: that}. See the module docstring.
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not one of {', '.join(POOLS)}")
    if max_length < 3:
        raise ValueError(f"max_length={max_length} is too small: a piece needs at least 3 tokens")
    if batch_tokens < max_length:
        raise ValueError(f"batch_tokens={batch_tokens} is smaller than max_length={max_length}: "
                         "raise batch_tokens or lower max_length")
    if isinstance(sequences, (str, bytes)):
        sequences = [sequences]
    sequences = list(sequences)
    n_layers = len(model.blocks)
    keys, absolute, single = _resolve_layers(layer, n_layers)
    need_blocks = any(a > 0 for a in absolute)
    if device is not None:
        model.to(device)
    device = _model_device(model)

    # ---- encode and cut into pieces: (seq index, piece index, tokens) ----
    encoded = []
    for i, s in enumerate(sequences):
        ids = encode(s)
        if ids.size <= 2:
            raise ValueError(f"sequence {i} has no residues")
        encoded.append(ids)
    pieces = []  # (seq, piece number, n pieces, tokens)
    for i, ids in enumerate(encoded):
        spans = _pieces(ids, max_length)
        for j, (a, b) in enumerate(spans):
            pieces.append((i, j, len(spans), ids[a:b]))
    order = sorted(range(len(pieces)), key=lambda p: (-pieces[p][3].size, p))

    # ---- pack into streams of <= batch_tokens tokens ----
    from .packing import max_docs

    cap = max_docs(batch_tokens)  # the varlen attention kernel's fixed number of segments per stream
    streams, current, used = [], [], 0
    for p in order:
        n = pieces[p][3].size
        if used + n > batch_tokens or len(current) >= cap:
            streams.append(current)
            current, used = [], 0
        current.append(p)
        used += n
    if current:
        streams.append(current)

    # ---- forward ----
    d = model.cfg.dim
    n_seq = len(sequences)
    wanted = sorted(set(absolute))
    # mean/cls accumulate on the model's device (one index_add per layer and stream); "none" keeps, per
    # layer and sequence, {piece number: (n, d) CPU states}
    sums = {a: torch.zeros(n_seq, d, device=device) for a in wanted} if pool == "mean" else None
    counts = torch.zeros(n_seq, device=device) if pool == "mean" else None
    cls = {a: torch.zeros(n_seq, d, device=device) for a in wanted} if pool == "cls" else None
    parts = {a: [{} for _ in range(n_seq)] for a in wanted} if pool == "none" else None

    fixed_shape = getattr(model, "attn_backend", "sdpa") == "flex"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for members in streams:
                T = sum(pieces[p][3].size for p in members)
                if fixed_shape:  # FlexAttention is compiled per shape: every stream has batch_tokens tokens
                    T_pad = batch_tokens
                else:  # SDPA pays for the padding segment quadratically: pad only to a multiple of 128
                    T_pad = min(-(-T // _PAD_TO) * _PAD_TO, batch_tokens)
                tokens = np.full(T_pad, PAD, dtype=np.int64)
                doc_ids = np.full(T_pad, -1, dtype=np.int32)
                owner = np.full(T_pad, -1, dtype=np.int64)  # sequence of each residue token, -1 elsewhere
                spans, cls_at, pos = [], [], 0
                for k, p in enumerate(members):
                    i, j, n_pieces, t = pieces[p]
                    tokens[pos:pos + t.size] = t
                    doc_ids[pos:pos + t.size] = k
                    lo = pos + (1 if j == 0 else 0)  # drop <cls>
                    hi = pos + t.size - (1 if j == n_pieces - 1 else 0)  # drop <eos>
                    owner[lo:hi] = i
                    spans.append((i, j, lo, hi))
                    if j == 0:
                        cls_at.append((i, pos))
                    pos += t.size
                ids_t = torch.from_numpy(tokens).to(device)
                doc_t = torch.from_numpy(doc_ids).to(device)
                states = {}
                if 0 in wanted:
                    states[0] = model.embed_tokens(ids_t, dtype)
                if need_blocks:
                    _, layers = model(ids_t, doc_t, max_length, dtype=dtype, return_layers=True)
                    for a in wanted:
                        if a > 0:
                            states[a] = layers[a - 1]
                if pool == "mean":
                    owner_t = torch.from_numpy(owner).to(device)
                    keep = owner_t >= 0
                    idx = owner_t[keep]
                    counts.index_add_(0, idx, torch.ones(idx.numel(), device=device))
                    for a, h in states.items():
                        sums[a].index_add_(0, idx, h[keep].float())
                elif pool == "cls":
                    rows = torch.tensor([i for i, _ in cls_at], device=device)
                    at = torch.tensor([q for _, q in cls_at], device=device)
                    for a, h in states.items():
                        cls[a][rows] = h[at].float()
                else:
                    for a, h in states.items():
                        h = h.float().cpu()
                        for i, j, lo, hi in spans:
                            parts[a][i][j] = h[lo:hi].clone()
    finally:
        model.train(was_training)

    out = {}
    for key, a in zip(keys, absolute):
        if pool == "mean":
            out[key] = (sums[a] / counts.unsqueeze(1)).cpu()
        elif pool == "cls":
            out[key] = cls[a].cpu().clone()
        else:
            out[key] = [torch.cat([parts[a][i][j] for j in sorted(parts[a][i])]) for i in range(n_seq)]
    return out[keys[0]] if single else out


class _CallableModule(types.ModuleType):
    """`speedrun.embed` is both this module and, called, the `embed` function: the package's lazy
    top-level `speedrun.embed(...)` keeps working after `import speedrun.embed` rebinds the name."""

    def __call__(self, *args, **kwargs):
        return embed(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["embed", "POOLS"]

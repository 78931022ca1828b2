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
from typing import Iterable, List, Sequence, Union

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


def _cut(sequences: List[str], max_length: int):
    """Encode each sequence and cut it into pieces of <= max_length tokens: a list of
    (sequence index, piece number, number of pieces, tokens), longest first."""
    pieces = []
    for i, s in enumerate(sequences):
        ids = encode(s)
        if ids.size <= 2:
            raise ValueError(f"sequence {i} has no residues")
        spans = _pieces(ids, max_length)
        for j, (a, b) in enumerate(spans):
            pieces.append((i, j, len(spans), ids[a:b]))
    order = sorted(range(len(pieces)), key=lambda p: (-pieces[p][3].size, p))
    return [pieces[p] for p in order]


def _pack(pieces, batch_tokens: int):
    """Greedy first-fit of pieces (already longest first) into streams of <= batch_tokens tokens and at
    most the varlen kernel's fixed number of segments: a list of lists of pieces."""
    from .packing import max_docs

    cap = max_docs(batch_tokens)
    streams, current, used = [], [], 0
    for piece in pieces:
        n = piece[3].size
        if used + n > batch_tokens or len(current) >= cap:
            streams.append(current)
            current, used = [], 0
        current.append(piece)
        used += n
    if current:
        streams.append(current)
    return streams


def _layout(members, T_pad: int):
    """One stream's arrays: tokens, document ids, the sequence owning each residue token (-1 for
    <cls>/<eos>/padding), the residue span (seq, piece, lo, hi) of each piece and the <cls> positions."""
    tokens = np.full(T_pad, PAD, dtype=np.int64)
    doc_ids = np.full(T_pad, -1, dtype=np.int32)
    owner = np.full(T_pad, -1, dtype=np.int64)
    spans, cls_at, pos = [], [], 0
    for k, (i, j, n_pieces, t) in enumerate(members):
        tokens[pos:pos + t.size] = t
        doc_ids[pos:pos + t.size] = k
        lo = pos + (1 if j == 0 else 0)  # drop <cls>
        hi = pos + t.size - (1 if j == n_pieces - 1 else 0)  # drop <eos>
        owner[lo:hi] = i
        spans.append((i, j, lo, hi))
        if j == 0:
            cls_at.append((i, pos))
        pos += t.size
    return tokens, doc_ids, owner, spans, cls_at


class _Pooler:
    """Accumulates per-layer states into the pooled result. mean/cls accumulate on the model's device
    (one index_add per layer and stream); "none" keeps, per layer and sequence, {piece: (n, d) CPU}."""

    def __init__(self, pool: str, layers, n_seq: int, d: int, device):
        self.pool, self.n_seq, self.device = pool, n_seq, device
        if pool == "none":
            self.parts = {a: [{} for _ in range(n_seq)] for a in layers}
        else:
            self.acc = {a: torch.zeros(n_seq, d, device=device) for a in layers}
            self.counts = torch.zeros(n_seq, device=device)

    def add(self, states, owner, spans, cls_at):
        if self.pool == "mean":
            owner_t = torch.from_numpy(owner).to(self.device)
            keep = owner_t >= 0
            idx = owner_t[keep]
            self.counts.index_add_(0, idx, torch.ones(idx.numel(), device=self.device))
            for a, h in states.items():
                self.acc[a].index_add_(0, idx, h[keep].float())
        elif self.pool == "cls":
            rows = torch.tensor([i for i, _ in cls_at], device=self.device)
            at = torch.tensor([q for _, q in cls_at], device=self.device)
            for a, h in states.items():
                self.acc[a][rows] = h[at].float()
        else:
            for a, h in states.items():
                h = h.float().cpu()
                for i, j, lo, hi in spans:
                    self.parts[a][i][j] = h[lo:hi].clone()

    def result(self, a):
        if self.pool == "mean":
            return (self.acc[a] / self.counts.unsqueeze(1)).cpu()
        if self.pool == "cls":
            return self.acc[a].cpu().clone()
        parts = self.parts[a]
        return [torch.cat([parts[i][j] for j in sorted(parts[i])]) for i in range(self.n_seq)]


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
    keys, absolute, single = _resolve_layers(layer, len(model.blocks))
    wanted = sorted(set(absolute))
    if device is not None:
        model.to(device)
    device = _model_device(model)
    streams = _pack(_cut(sequences, max_length), batch_tokens)
    pooler = _Pooler(pool, wanted, len(sequences), model.cfg.dim, device)

    fixed_shape = getattr(model, "attn_backend", "sdpa") == "flex"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for members in streams:
                T = sum(piece[3].size for piece in members)
                if fixed_shape:  # FlexAttention is compiled per shape: every stream has batch_tokens tokens
                    T_pad = batch_tokens
                else:  # SDPA pays for the padding segment quadratically: pad only to a multiple of 128
                    T_pad = min(-(-T // _PAD_TO) * _PAD_TO, batch_tokens)
                tokens, doc_ids, owner, spans, cls_at = _layout(members, T_pad)
                ids_t = torch.from_numpy(tokens).to(device)
                doc_t = torch.from_numpy(doc_ids).to(device)
                states = {}
                if 0 in wanted:
                    states[0] = model.embed_tokens(ids_t, dtype)
                if any(a > 0 for a in wanted):
                    _, layers = model(ids_t, doc_t, max_length, dtype=dtype, return_layers=True)
                    states.update({a: layers[a - 1] for a in wanted if a > 0})
                pooler.add(states, owner, spans, cls_at)
    finally:
        model.train(was_training)
    out = {key: pooler.result(a) for key, a in zip(keys, absolute)}
    return out[keys[0]] if single else out


class _CallableModule(types.ModuleType):
    """`speedrun.embed` is both this module and, called, the `embed` function: the package's lazy
    top-level `speedrun.embed(...)` keeps working after `import speedrun.embed` rebinds the name."""

    def __call__(self, *args, **kwargs):
        return embed(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["embed", "POOLS"]

"""speedrun-plm models for transformers: AutoModel / AutoModelForMaskedLM with trust_remote_code.

Written by speedrun-plm (speedrun/hf) into every export folder, so the folder loads with torch and
transformers alone. It re-implements speedrun's architectures (speedrun/models/unet.py: `unet`,
`transformer`; speedrun/models/patch_unet.py: `patch_unet`) for padded (B, L) batches with the
parameter names of speedrun's own modules, so model.safetensors loads as it is.

One sequence per row, `attention_mask` marking its tokens (right or left padding). Attention stays
within the sequence and within the sliding window the model finished training with
(`config.window`); RoPE positions count from the row start, as speedrun's for a sequence that starts
its stream, so the logits equal speedrun's to float rounding. The Patch-UNet pads rows to a power of
two (its PatchMerge halves the length per level) and, like speedrun, never lets padding into a
sequence.

`output_hidden_states=True`: the (normed) embedding output, then every block's output; the last is
replaced by the final normed state, as transformers' models do. Patch-UNet blocks below full
resolution give their level's length and width: (B, ceil(L / 2^level), d_level).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .configuration_speedrun_plm import SpeedrunPLMConfig

MASK_ID = 32  # <mask> in the ESM-2 vocabulary (speedrun/vocab.py)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False)


def mlp_hidden(m, dim):
    """speedrun.config.mlp_hidden: ceil(mlp_ratio * dim / mlp_multiple) * mlp_multiple."""
    return int(math.ceil(m["mlp_ratio"] * dim / m["mlp_multiple"] - 1e-9)) * m["mlp_multiple"]


def pool(x):
    """Average adjacent pairs along dim 1."""
    return 0.5 * (x[:, 0::2] + x[:, 1::2])


def rotate(x, base):
    """speedrun's half-split RoPE over dim 1 of (B, L, H, D), positions 0..L-1."""
    head_dim = x.size(-1)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=x.device).float() / head_dim)
    freqs = torch.outer(torch.arange(x.size(1), device=x.device, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def row_mask(doc, window):
    """(B, 1, L, L) bool: same live document (id >= 0) and |q - k| < window, or q == k."""
    i = torch.arange(doc.size(1), device=doc.device)
    near = (i[:, None] - i[None, :]).abs() < window
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0) & near
    return (same | (i[:, None] == i[None, :])).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim, n_heads, value_mix, base):
        super().__init__()
        self.n_heads, self.base = n_heads, base
        self.q, self.k, self.v, self.o = linear(dim, dim), linear(dim, dim), linear(dim, dim), linear(dim, dim)
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if value_mix else None

    def forward(self, x, ve, mask):
        B, L, _ = x.shape
        shape = (B, L, self.n_heads, -1)
        q, k, v = self.q(x).view(shape), self.k(x).view(shape), self.v(x).view(shape)
        if self.lambdas is not None and ve is not None:
            v = self.lambdas[0] * v + self.lambdas[1] * ve.view(shape)
        q, k = rotate(norm(q), self.base), rotate(norm(k), self.base)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.up, self.down = linear(dim, hidden), linear(hidden, dim)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    """x <- λ0·x + λ1·P(x0) (unet), x += Attn(norm(x), ve), x += MLP(norm(x)); without attention it is
    the Patch-UNet's BottleneckMLP."""

    def __init__(self, dim, base_dim, n_heads, hidden, unet, value_mix, base, attention=True):
        super().__init__()
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0])) if unet else None
        self.x0_proj = linear(base_dim, dim) if unet and dim != base_dim else None
        self.attn = Attention(dim, n_heads, unet and value_mix, base) if attention else None
        self.mlp = MLP(dim, hidden)

    def forward(self, x, x0, ve, mask):
        if self.lambdas is not None:
            x0 = self.x0_proj(x0) if self.x0_proj is not None else x0
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask)
        return x + self.mlp(norm(x))


class Resample(nn.Module):
    """PatchMerge (pairs concatenated, then 2·d_in -> d_out) or PatchExpand (d_in -> 2·d_out, split)."""

    def __init__(self, d_in, d_out, merge):
        super().__init__()
        self.merge, self.d_out = merge, d_out
        self.proj = linear(2 * d_in, d_out) if merge else linear(d_in, 2 * d_out)

    def forward(self, x):
        B, L, D = x.shape
        if self.merge:
            return self.proj(x.reshape(B, L // 2, 2 * D))
        return self.proj(x).reshape(B, 2 * L, self.d_out)


class LMHead(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.kind, self.soft_cap = m["head"], m["soft_cap"]
        if self.kind == "mlp":
            self.dense = linear(m["dim"], m["dim"])
            self.bias = nn.Parameter(torch.zeros(m["vocab_size"]))
        self.decoder = linear(m["dim"], m["vocab_size"])

    def forward(self, h):
        z = self.decoder(F.gelu(self.dense(h))).float() + self.bias if self.kind == "mlp" else self.decoder(h).float()
        return self.soft_cap * torch.tanh(z / self.soft_cap) if self.soft_cap > 0 else z


def hidden_sizes(dim, n_levels, n_heads, max_head_dim=128):
    """speedrun.models.patch_unet.hidden_sizes."""
    a = 64 * n_heads // math.gcd(64, n_heads)
    cap = (n_heads * max_head_dim // a) * a
    return [min(int(math.ceil(dim * (1.0 + i / max(n_levels - 1, 1)) / a - 1e-9)) * a, cap) for i in range(n_levels)]


class SpeedrunPLMPreTrainedModel(PreTrainedModel):
    config_class = SpeedrunPLMConfig
    base_model_prefix = "speedrun_plm"  # no module has this name: checkpoint keys are speedrun's, unprefixed
    _tied_weights_keys = None


class SpeedrunPLMModel(SpeedrunPLMPreTrainedModel):
    """The trunk: (B, L) input_ids and attention_mask -> BaseModelOutput (final normed states)."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # the folder holds the LM head too

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        self.arch, self.window, self.base = m["arch"], config.window, m["rope_base"]
        self.embed = nn.Embedding(m["vocab_size"], m["dim"])
        if self.arch == "patch_unet":
            self._build_patch_unet(m, config.max_length)
        else:
            self._build_stack(m)
        self._build_head(m)
        self.post_init()

    def _build_head(self, m):
        """The trunk has none (SpeedrunPLMForMaskedLM adds speedrun's LM head)."""

    def _build_stack(self, m):
        """speedrun.models.unet.ProteinLM (unet, transformer) without its head."""
        d, L = m["dim"], m["n_layers"]
        self.unet = self.arch == "unet"
        ve = self.unet and m["value_embeddings"]
        self.value_embeds = nn.ModuleList([nn.Embedding(m["vocab_size"], d) for _ in range(L // 2)] if ve else [])
        self.blocks = nn.ModuleList([Block(d, d, m["n_heads"], mlp_hidden(m, d), self.unet, ve, self.base)
                                     for _ in range(L)])
        self.skip_weights = nn.Parameter(torch.ones(L // 2)) if self.unet else None

    def _build_patch_unet(self, m, max_length):
        """speedrun.models.patch_unet.PatchUNet without its head."""
        d, H, E, V, ve = m["dim"], m["n_heads"], m["n_layers"] // 2, m["vocab_size"], m["value_embeddings"]
        self.n_levels, self.vector_depth = E, int(math.log2(max_length))
        self.n_merges = min(E - 1, self.vector_depth)
        self.level_of = [min(i, self.vector_depth) for i in range(E)]
        size = [hidden_sizes(d, E, H)[lvl] for lvl in self.level_of]
        live = [i for i in range(E) if i < self.vector_depth]  # depths with attention (and value embeddings)
        self.encoder_embed = nn.ModuleList([nn.Embedding(V, size[i]) for i in live] if ve else [])
        self.decoder_embed = nn.ModuleList([nn.Embedding(V, size[i]) for i in reversed(live)] if ve else [])

        def block(i):
            return Block(size[i], d, H, mlp_hidden(m, size[i]), True, ve, self.base, i < self.vector_depth)

        self.in_proj = linear(d, size[0]) if size[0] != d else None
        self.out_proj = linear(size[0], d) if size[0] != d else None
        self.encoder = nn.ModuleList([block(i) for i in range(E)])
        self.merges = nn.ModuleList([Resample(size[i], size[i + 1], True) for i in range(self.n_merges)])
        self.expands = nn.ModuleList([Resample(size[E - j], size[E - 1 - j], False) for j in range(1, E)
                                      if E - j <= self.n_merges])
        self.decoder = nn.ModuleList([block(E - 1 - j) for j in range(E)])
        self.skip_weights = nn.Parameter(torch.ones(E))
        self.extra = nn.ModuleList([Block(d, d, H, mlp_hidden(m, d), False, False, self.base)
                                    for _ in range(m["n_extra_layers"])])

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def _embedding(self, input_ids):
        x = self.embed(input_ids)
        if self.config.model["token_dropout"]:
            x = x.masked_fill((input_ids == MASK_ID).unsqueeze(-1), 0.0)
        return norm(x)

    def _stack(self, input_ids, doc):
        x0 = x = self._embedding(input_ids)
        mask = row_mask(doc, self.window)
        ves = [ve(input_ids) for ve in self.value_embeds]
        ves = ves + ves[::-1] if ves else [None] * len(self.blocks)
        half, skips, states = len(self.blocks) // 2, [], [x0]
        for i, block in enumerate(self.blocks):
            if self.unet and i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            x = block(x, x0, ves[i], mask)
            if self.unet and i < half:
                skips.append(x)
            states.append(x)
        return norm(x), states

    def _value_embeddings(self, input_ids, dtype):
        """Per depth, the level's table average-pooled to the level's length (pooled one-hot counts @ table)."""
        E = self.n_levels
        enc, dec = [None] * E, [None] * E
        if not len(self.encoder_embed):
            return enc, dec
        counts = [F.one_hot(input_ids, self.config.model["vocab_size"]).to(dtype)]
        while len(counts) <= self.n_merges:
            counts.append(pool(counts[-1]))

        def lookup(table, depth):
            lvl = self.level_of[depth]
            return table(input_ids) if lvl == 0 else counts[lvl] @ table.weight

        for i, table in enumerate(self.encoder_embed):
            enc[i] = lookup(table, i)
        for j, table in zip(range(E - len(self.decoder_embed), E), self.decoder_embed):
            dec[j] = lookup(table, E - 1 - j)
        return enc, dec

    def _patch_unet(self, input_ids, doc):
        docs = [doc]
        for _ in range(self.n_merges):  # a merged position is live only if both halves are one document
            a, b = docs[-1][:, 0::2], docs[-1][:, 1::2]
            docs.append(torch.where((a == b) & (a >= 0), a, torch.full_like(a, -1)))
        masks = [row_mask(dl, self.window) for dl in docs]
        x = self._embedding(input_ids)
        x0s = [x]
        for _ in range(self.n_merges):
            x0s.append(pool(x0s[-1]))
        ve_enc, ve_dec = self._value_embeddings(input_ids, x.dtype)
        h = self.in_proj(x) if self.in_proj is not None else x
        skips, states = [], [x]
        for i, block in enumerate(self.encoder):
            h = block(h, x0s[self.level_of[i]], ve_enc[i], masks[self.level_of[i]])
            skips.append(h)
            states.append(h)
            if i < self.n_merges:
                h = self.merges[i](h)
        expands = iter(self.expands)
        for j, block in enumerate(self.decoder):
            depth = self.n_levels - 1 - j
            if j > 0 and depth + 1 <= self.n_merges:  # a position whose parent straddles documents gets nothing
                h = next(expands)(h) * (docs[depth + 1] >= 0).repeat_interleave(2, dim=1).unsqueeze(-1).to(h.dtype)
            h = h + self.skip_weights[j] * skips.pop()
            h = block(h, x0s[self.level_of[depth]], ve_dec[j], masks[self.level_of[depth]])
            states.append(h)
        if self.out_proj is not None:
            h = self.out_proj(h)
        for block in self.extra:
            h = block(h, None, None, masks[0])
            states.append(h)
        return norm(h), states

    def trunk(self, input_ids, attention_mask=None):
        """(final normed states (B, L, d), [embedding output, every block's output])."""
        B, L = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        doc = torch.where(valid, 0, -1).to(torch.int32)
        if self.arch != "patch_unet":
            return self._stack(input_ids, doc)
        rows = max(1 << max(L - 1, 1).bit_length(), 1 << self.n_merges)  # a power of two >= L
        h, states = self._patch_unet(F.pad(input_ids, (0, rows - L), value=1), F.pad(doc, (0, rows - L), value=-1))
        return h[:, :L], [s[:, : -(-L // (rows // s.size(1)))] for s in states]

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **kwargs):
        h, states = self.trunk(input_ids, attention_mask)
        return _output(BaseModelOutput, self.config, output_hidden_states, return_dict, states, h,
                       last_hidden_state=h)


def _output(cls, config, output_hidden_states, return_dict, states, h, **fields):
    """transformers' output object (or tuple); hidden_states end with the final normed state."""
    if output_hidden_states if output_hidden_states is not None else config.output_hidden_states:
        fields["hidden_states"] = tuple(states[:-1]) + (h,)
    out = cls(**fields)
    return out.to_tuple() if return_dict is False else out


class SpeedrunPLMForMaskedLM(SpeedrunPLMModel):
    """The trunk and speedrun's LM head: MaskedLMOutput(loss, logits (fp32), hidden_states)."""

    _tied_weights_keys = {"lm_head.decoder.weight": "embed.weight"}  # used when config.tie_word_embeddings
    _keys_to_ignore_on_load_unexpected = None

    def _build_head(self, m):
        self.lm_head = LMHead(m)
        if m["tie_embeddings"]:
            self.lm_head.decoder.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, value):
        self.lm_head.decoder = value

    def forward(self, input_ids, attention_mask=None, labels=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        h, states = self.trunk(input_ids, attention_mask)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:  # -100 is ignored
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.to(logits.device).view(-1))
        return _output(MaskedLMOutput, self.config, output_hidden_states, return_dict, states, h, loss=loss,
                       logits=logits)

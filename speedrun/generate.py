"""Sample proteins from a trained run by iterative unmasking (DSM's sampler, RECIPE.md §10).

    python -m speedrun.generate RUN_DIR [num=16] [length=256] [steps=0] [temperature=1.0] [top_k=0]
        [top_p=1.0] [remasking=random|low_confidence|low_logit|dual] [seed=0] [out=FILE.fasta]
        [infill=FILE_OR_SEQ] [extended=false] [device=auto] [batch=64] [window=0]

Works with any checkpoint of the project (MLM- or diffusion-trained `ProteinLM`, or a `PatchUNet`):
the newest complete checkpoint of RUN_DIR/checkpoints is loaded.

**Sampler.** Each sequence starts from a template `<cls> <mask>×L <eos>` (or, with `infill`, from given
sequences whose `<mask>`, `_` or `#` positions are to be filled; given letters are kept). With M
masked positions and S steps, step s commits n_s = ⌊M/S⌋ positions, plus one for the first M mod S
steps (DSM's even split; S = 0 means DSM's default max(1, M // 10)). At each step:

1. one forward over all sequences of a batch, packed into one stream with per-sequence doc ids
   (Patch-UNet: one padded row per sequence), logits at the masked positions;
2. a candidate letter per masked position by Gumbel-max, argmax(z + T·g) = a sample from
   softmax(z/T), over the allowed letters only (the 20 canonical amino acids; with `extended=true`
   also X B U Z O) after optional top-k / top-p (nucleus, on softmax(z/T)) filtering; T = 0 is argmax;
3. a confidence per masked position: `random` uniform (DSM's default), `low_confidence` the
   candidate's probability under softmax(z) restricted to the allowed letters, `low_logit` its raw
   logit, `dual` probability × uniform / 2;
4. the n_s most confident masked positions take their candidates (ties: leftmost first); the others
   stay masked.

Any mask left after the S steps (none with this schedule) is filled in one final pass. Special tokens
and gap symbols are never sampled, so the output holds letters only.

Randomness: every output sequence i has its own generator seeded from (seed, i), and its draws (a
Gumbel vector per masked position, then a uniform per masked position) are the same whatever T,
top-k, top-p or remasking are: a fixed seed gives the same samples, and top_k=1 equals T=0 (greedy).
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import SpeedrunError
from .config import ModelConfig
from .objectives import generator_for
from .vocab import CLS, EOS, MASK, PAD, TOKEN_TO_ID, TOKENS

REMASKING = ("random", "low_confidence", "low_logit", "dual")
CANONICAL_IDS = tuple(range(4, 24))  # L A G V S E R T I D P K Q N F Y M H W C
EXTENDED_IDS = tuple(range(4, 29))  # + X B U Z O
MASK_MARKS = "_#"
USAGE = __doc__.split("\n\n")[1]


MAX_LENGTH_FACTOR = 4  # generated sequences may be at most this many times the training crop


class GenerateError(SpeedrunError):
    """A generation request that cannot run. The message is one line and names the fix."""


@dataclass
class GenerateConfig:
    num: Optional[int] = None  # sequences to sample (default 16); with infill: samples per given sequence (1)
    length: int = 256  # residues per unconditional sample (<cls>/<eos> not counted)
    steps: int = 0  # unmasking steps; 0 = DSM's default max(1, masked // 10)
    temperature: float = 1.0  # Gumbel-max temperature; 0 = argmax
    top_k: int = 0  # keep the k most likely letters before sampling; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set of letters with probability >= top_p; 1 = off
    remasking: str = "random"  # random | low_confidence | low_logit | dual (which masks to commit first)
    seed: int = 0
    out: Optional[str] = None  # FASTA file; default stdout
    infill: Optional[str] = None  # FASTA/text file or sequence(s) (comma-separated); <mask>, _ or # = fill
    extended: bool = False  # also allow X B U Z O (25 letters) instead of the 20 canonical amino acids
    device: str = "auto"  # auto | cpu | cuda
    batch: int = 64  # sequences per forward
    window: int = 0  # attention window; 0 = the run's final training window
    overwrite: bool = False  # replace an existing out= file (never one of the inputs)


# ---------------------------------------------------------------------------------------- schedule
def commit_schedule(n_masked: int, steps: int) -> list[int]:
    """Positions committed at each of `steps` steps: ⌊M/S⌋ each, one more for the first M mod S."""
    base, extra = divmod(int(n_masked), int(steps))
    return [base + (1 if s < extra else 0) for s in range(steps)]


def default_steps(max_masked: int) -> int:
    return max(1, max_masked // 10)


# ---------------------------------------------------------------------------------------- templates
def unconditional_template(length: int) -> torch.Tensor:
    t = torch.full((length + 2,), MASK, dtype=torch.long)
    t[0], t[-1] = CLS, EOS
    return t


def infill_template(seq: str) -> torch.Tensor:
    """`<cls> residues <eos>` where `<mask>`, `_` and `#` become `<mask>`; letters kept (upper-cased)."""
    s = re.sub(r"(?i)<mask>", "#", re.sub(r"\s+", "", seq)).upper()
    ids = [CLS]
    for ch in s:
        if ch in MASK_MARKS:
            ids.append(MASK)
        elif ch in TOKEN_TO_ID and TOKEN_TO_ID[ch] in EXTENDED_IDS:
            ids.append(TOKEN_TO_ID[ch])
        else:
            raise GenerateError(f"infill sequence {seq[:30]!r}{'...' if len(seq) > 30 else ''} holds {ch!r}: use "
                                f"amino-acid letters and <mask>, _ or # for positions to fill")
    ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def read_infill(arg: str) -> list[tuple[str, str]]:
    """(name, sequence) pairs from a FASTA file, a text file (one sequence a line) or the argument
    itself (sequences separated by commas)."""
    p = Path(arg)
    if p.is_file():
        text = p.read_text()
        if text.lstrip().startswith(">"):
            out, name, buf = [], None, []
            for line in text.splitlines():
                if line.startswith(">"):
                    if name is not None:
                        out.append((name, "".join(buf)))
                    name, buf = line[1:].strip().split()[0] if line[1:].strip() else f"infill_{len(out)}", []
                else:
                    buf.append(line.strip())
            if name is not None:
                out.append((name, "".join(buf)))
        else:
            out = [(f"infill_{i}", line.strip()) for i, line in enumerate(
                [ln for ln in text.splitlines() if ln.strip()])]
    else:
        out = [(f"infill_{i}", s.strip()) for i, s in enumerate(arg.split(",")) if s.strip()]
    if not out:
        raise GenerateError(f"infill={arg!r} holds no sequence: pass a FASTA file, a text file or a sequence")
    return out


# ---------------------------------------------------------------------------------------- model calls
def _is_rows_model(model) -> bool:
    return hasattr(model, "max_length") and hasattr(model, "n_merges")  # PatchUNet


@torch.no_grad()
def masked_logits(model, seqs: Sequence[torch.Tensor], window: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """fp32 logits (n_i, V) at the `<mask>` positions of every sequence, from one forward.

    ProteinLM: one packed stream, doc id = sequence index. PatchUNet: one row per sequence, padded
    with `<pad>` (doc id -1) to the model's row length."""
    device = seqs[0].device
    if _is_rows_model(model):
        L = model.max_length
        ids = torch.full((len(seqs), L), PAD, dtype=torch.long, device=device)
        doc = torch.full((len(seqs), L), -1, dtype=torch.int32, device=device)
        for i, s in enumerate(seqs):
            ids[i, :s.numel()], doc[i, :s.numel()] = s, i
        h = model(ids, doc, window, dtype=dtype)
        flat_ids, flat_h = ids.reshape(-1), h.reshape(-1, h.size(-1))
    else:
        flat_ids = torch.cat(list(seqs))
        doc = torch.cat([torch.full((s.numel(),), i, dtype=torch.int32, device=device) for i, s in enumerate(seqs)])
        flat_h = model(flat_ids, doc, window, dtype=dtype)
    idx = torch.nonzero(flat_ids == MASK).flatten()
    z = model.logits(flat_h[idx]).float()
    return list(z.split([int((s == MASK).sum()) for s in seqs]))


# ---------------------------------------------------------------------------------------- sampling
def choose(z: torch.Tensor, gen: torch.Generator, allowed: torch.Tensor, temperature: float, top_k: int,
           top_p: float, remasking: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token ids (n,) and confidences (n,) for logits z (n, V).

    Draws, in this order and always the same amount: n×len(allowed) uniforms (Gumbel), n uniforms."""
    n, A = z.size(0), allowed.numel()
    u = torch.rand((n, A), generator=gen, dtype=torch.float64)
    u2 = torch.rand((n,), generator=gen, dtype=torch.float64)
    za = z.double()[:, allowed.to(z.device)].cpu()  # logits of the allowed letters only
    filt = za.clone()
    if top_k > 0 and top_k < A:
        kth = filt.topk(top_k, dim=-1).values[:, -1:]
        filt = filt.masked_fill(filt < kth, -math.inf)
    if top_p < 1.0 and temperature > 0:
        probs = torch.softmax(filt / temperature, dim=-1)
        sp, order = probs.sort(dim=-1, descending=True, stable=True)
        drop_sorted = (sp.cumsum(-1) - sp) >= top_p  # tokens after the nucleus is complete
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        filt = filt.masked_fill(drop, -math.inf)
    if temperature > 0:
        g = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        scores = filt + temperature * g
    else:
        scores = filt
    pick = scores.argmax(-1)
    cand = allowed.cpu()[pick]
    if remasking == "random":
        conf = u2
    elif remasking == "low_logit":
        conf = za.gather(1, pick[:, None]).squeeze(1)
    else:
        p = torch.softmax(za, dim=-1).gather(1, pick[:, None]).squeeze(1)
        conf = p if remasking == "low_confidence" else p * u2 / 2
    return cand, conf


@torch.no_grad()
def sample(model, templates: Sequence[torch.Tensor], *, steps: int = 0, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, remasking: str = "random", seed: int = 0, extended: bool = False,
           window: int = 1 << 30, dtype: torch.dtype = torch.float32, batch: int = 64,
           trace: Optional[list] = None) -> list[torch.Tensor]:
    """Fill the `<mask>` positions of every template; returns the filled id sequences (CPU).

    `trace`, if given, receives per batch a list of steps, each the number committed per sequence."""
    if remasking not in REMASKING:
        raise GenerateError(f"remasking={remasking!r} is not one of {', '.join(REMASKING)}")
    device = next(model.parameters()).device
    allowed = torch.tensor(EXTENDED_IDS if extended else CANONICAL_IDS, dtype=torch.long)
    masked = [int((t == MASK).sum()) for t in templates]
    S = steps if steps > 0 else default_steps(max(masked, default=0))
    out: list[torch.Tensor] = []
    for b0 in range(0, len(templates), batch):
        xs = [t.clone().to(device) for t in templates[b0:b0 + batch]]
        gens = [_cpu_generator(seed, b0 + i) for i in range(len(xs))]
        plans = [commit_schedule(masked[b0 + i], S) for i in range(len(xs))]
        batch_trace = []
        for s in range(S):
            counts = [plan[s] for plan in plans]
            batch_trace.append(counts)
            if not any(counts):
                continue
            zs = masked_logits(model, xs, window, dtype)
            for i, (x, z, n) in enumerate(zip(xs, zs, counts)):
                if n == 0:
                    continue
                pos = torch.nonzero(x == MASK).flatten()
                cand, conf = choose(z, gens[i], allowed, temperature, top_k, top_p, remasking)
                top = torch.sort(conf, descending=True, stable=True).indices[:n]
                x[pos[top.to(device)]] = cand[top].to(device)
        if any(bool((x == MASK).any()) for x in xs):  # fill whatever is left in one pass
            zs = masked_logits(model, xs, window, dtype)
            for i, (x, z) in enumerate(zip(xs, zs)):
                if z.numel():
                    cand, _ = choose(z, gens[i], allowed, temperature, top_k, top_p, remasking)
                    x[x == MASK] = cand.to(device)
        if trace is not None:
            trace.append(batch_trace)
        out.extend(x.cpu() for x in xs)
    return out


def _cpu_generator(seed: int, index: int) -> torch.Generator:
    return generator_for(torch.device("cpu"), 0x6E6, seed, index)


def letters(ids: torch.Tensor) -> str:
    """Residue letters of a filled sequence (specials dropped)."""
    return "".join(TOKENS[i] for i in ids.tolist() if len(TOKENS[i]) == 1)


# ---------------------------------------------------------------------------------------- runs
def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, the run's config dict, checkpoint path) from RUN_DIR's newest
    sound checkpoint (speedrun.models.open_model: JSON and safetensors only)."""
    from .models.load import ModelLoadError, open_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GenerateError(f"{run_dir} is not a directory: pass a run directory "
                            "(outputs/runs/<name>/<date>_<time>_<us>)")
    try:
        model = open_model(run_dir, device=device)
    except ModelLoadError as exc:
        raise GenerateError(str(exc)) from None
    return model, model.meta.get("training") or {}, Path(model.meta.get("checkpoint") or run_dir)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GenerateError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise GenerateError(f"device={name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def check(g: GenerateConfig) -> None:
    if g.remasking not in REMASKING:
        raise GenerateError(f"remasking={g.remasking!r} is not one of {', '.join(REMASKING)}")
    for key, ok, need in (("num", g.num is None or g.num >= 1, ">= 1"), ("length", g.length >= 1, ">= 1"),
                          ("steps", g.steps >= 0, ">= 0 (0 = max(1, masks // 10))"),
                          ("temperature", g.temperature >= 0, ">= 0"), ("top_k", g.top_k >= 0, ">= 0 (0 = off)"),
                          ("top_p", 0 < g.top_p <= 1, "in (0, 1]"), ("batch", g.batch >= 1, ">= 1"),
                          ("window", g.window >= 0, ">= 0")):
        if not ok:
            raise GenerateError(f"{key}={getattr(g, key)} must be {need}")


def generate(run_dir: str | os.PathLike, g: GenerateConfig, trace: Optional[list] = None,
             info: Optional[dict] = None) -> list[tuple[str, str]]:
    """(name, sequence) pairs for the request `g` on RUN_DIR's newest checkpoint. `info`, if given,
    receives the checkpoint path and the number of steps used."""
    check(g)
    device = resolve_device(g.device)
    model, cfg, path = load_run(run_dir, device)
    max_length = int(model.meta.get("max_length") or cfg.get("data", {}).get("max_length", 1024))
    window = g.window or int(cfg.get("train", {}).get("window_end") or max_length)
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.get("hardware", {}).get("precision") == "bf16" \
        else torch.float32
    if g.infill is not None:
        given = read_infill(g.infill)
        per = g.num or 1
        names, templates = [], []
        for name, seq in given:
            t = infill_template(seq)
            for k in range(per):
                names.append(name if per == 1 else f"{name}_sample{k}")
                templates.append(t)
    else:
        n = g.num or 16
        names = [f"sample_{i}" for i in range(n)]
        templates = [unconditional_template(g.length) for _ in range(n)]
    longest = max(t.numel() for t in templates)
    if _is_rows_model(model) and longest > max_length:
        raise GenerateError(f"a sequence of {longest - 2} residues needs {longest} positions but the Patch-UNet's "
                            f"rows hold data.max_length={max_length}: use length<={max_length - 2}")
    if longest > MAX_LENGTH_FACTOR * max_length:
        raise GenerateError(f"a sequence of {longest - 2} residues is more than {MAX_LENGTH_FACTOR}x the run's "
                            f"data.max_length={max_length}: the model never saw such lengths (and attention over it "
                            f"needs O(length^2) memory); use length<={MAX_LENGTH_FACTOR * max_length - 2}")
    if longest > max_length:
        print(f"warning: {longest} tokens is longer than the run's data.max_length={max_length} "
              "(the model never saw such lengths)", file=sys.stderr)
    steps = g.steps or default_steps(max(int((t == MASK).sum()) for t in templates))
    if info is not None:
        info.update(checkpoint=str(path), steps=steps, window=window, device=str(device))
    filled = sample(model, templates, steps=steps, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                    remasking=g.remasking, seed=g.seed, extended=g.extended, window=window, dtype=dtype,
                    batch=g.batch, trace=trace)
    return [(name, letters(ids)) for name, ids in zip(names, filled)]


def write_fasta(records: Sequence[tuple[str, str]], g: GenerateConfig, steps: int, stream) -> None:
    desc = f"steps={steps} T={g.temperature:g} top_k={g.top_k} top_p={g.top_p:g} remasking={g.remasking} seed={g.seed}"
    for name, seq in records:
        stream.write(f">{name} {desc}\n")
        for i in range(0, len(seq), 60):
            stream.write(seq[i:i + 60] + "\n")
        if not seq:
            stream.write("\n")


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str]) -> tuple[str, GenerateConfig]:
    import difflib

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    run_dir, pairs = None, []
    for a in argv:
        if "=" in a and not a.startswith("-"):
            pairs.append(a)
        elif a.startswith("-"):
            raise GenerateError(f"unknown option {a!r}: options are key=value (python -m speedrun.generate --help)")
        elif run_dir is None:
            run_dir = a
        else:
            raise GenerateError(f"unexpected argument {a!r}: pass one RUN_DIR and key=value options")
    if run_dir is None:
        raise GenerateError("missing RUN_DIR: python -m speedrun.generate RUN_DIR [num=16 length=256 ...]")
    keys = [f.name for f in dataclasses.fields(GenerateConfig)]
    for p in pairs:
        k = p.split("=", 1)[0]
        if k not in keys:
            close = difflib.get_close_matches(k, keys, n=1)
            raise GenerateError(f"unknown option '{k}': {'did you mean ' + close[0] + '? ' if close else ''}"
                                f"options are {', '.join(keys)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(GenerateConfig), OmegaConf.from_dotlist(pairs))
        g = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise GenerateError(f"bad value for '{key}': {str(exc).splitlines()[0]}") from None
    for key in ("infill", "out"):  # keep file names / sequences as given (from_dotlist may parse numbers)
        v = getattr(g, key)
        if v is not None and not isinstance(v, str):
            setattr(g, key, str(v))
    check(g)
    return run_dir, g


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage:\n" + USAGE + "\n\n" + __doc__.split("\n\n", 2)[2])
        return 0 if argv else 2
    try:
        run_dir, g = parse_args(argv)
        if g.out:  # refused before sampling: an existing file (unless overwrite=true), and never an input
            from .fsutil import claim_output_file

            infill = [g.infill] if g.infill and Path(g.infill).exists() else []
            claim_output_file(g.out, g.overwrite, inputs=infill)
        info: dict = {}
        records = generate(run_dir, g, info=info)
        if g.out:
            from .fsutil import atomic_write

            buf = io.StringIO()
            write_fasta(records, g, info["steps"], buf)
            Path(g.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(g.out, buf.getvalue())
            print(f"wrote {len(records)} sequence(s) to {g.out} ({info['steps']} steps, {info['checkpoint']})",
                  file=sys.stderr)
        else:
            write_fasta(records, g, info["steps"], sys.stdout)
    except SpeedrunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

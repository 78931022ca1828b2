"""Check and time the hand-written kernels on one GPU: `python -m speedrun.bench.kernels [--quick]`.

Why one script: the kernels (speedrun/kernels) are written on a machine without a GPU, so this is where
they first meet one. On realistic shapes (65,536 packed tokens, 6 heads x 128, bf16; documents with
log-normal lengths of mean ~390 cropped at 1,024, then trailing padding, laid out by
`speedrun.attention.varlen_offsets` as training does) it

1. checks FlashAttention-4 (`speedrun.kernels.fa4`) forward and backward (out, lse, dq, dk, dv) against
   an fp32 per-document reference and against FA2 (`torch.nn.attention.varlen.varlen_attn`), without
   and with a sliding window (256), padding included; that padding never reaches a document; that the
   op compiles into one graph (fullgraph=True); and `fa4.probe`;
2. checks the Triton kernels of `speedrun.kernels.rope` forward and backward against the formula in
   fp32 (within one bf16/fp32 ulp): `qk_norm_rope` (QK RMS-norm + RoPE on the q, k views) and
   `qkv_norm_rope_mix` (the same plus the value-embedding mix, from the QKV GEMM's output);
3. times each against its reference (FA2; torch.compile'd norm + RoPE) with triton.testing.do_bench
   (median), and the whole step from the QKV output to attention's inputs as the model's compiled block
   runs it: Inductor alone, Inductor around qk_norm_rope, and qkv_norm_rope_mix;

and prints a table last. Every variant runs in its own try/except. Exit code 0 when nothing failed
(FA4 or triton missing counts as skipped, with the reason printed), 1 when a check failed or raised.
Needs torch (+ triton for the rope kernel and do_bench; + flash_attn.cute for FA4). On the H200 image:
`PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python -m speedrun.bench.kernels`
after ../shared/tools/gpu/fa4_wheels.sh's install step.
"""
from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from typing import Callable, Optional

import torch

from ..errors import one_line
from ..kernels import fa4, rope
from ..kernels.fa4 import max_rel_error


class Table:
    """Rows of (section, name, status, detail); status is ok / FAIL / error / skip / time."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, section: str, name: str, status: str, detail: str) -> None:
        self.rows.append((section, name, status, detail))
        print(f"[{status}] {section}: {name}: {detail}", flush=True)

    def attempt(self, section: str, name: str, fn: Callable[[], Optional[str]]) -> None:
        """Run one variant; its return value is an ok detail, exceptions become error rows."""
        try:
            detail = fn()
            if detail is not None:
                self.add(section, name, "ok", detail)
        except Exception as exc:
            self.add(section, name, "error", one_line(exc))

    def check(self, section: str, name: str, passed: bool, detail: str) -> None:
        self.add(section, name, "ok" if passed else "FAIL", detail)

    def print(self) -> None:
        width = max((len(f"{s}: {n}") for s, n, _, _ in self.rows), default=10)
        print("\n" + "=" * 100)
        for s, n, status, detail in self.rows:
            print(f"{f'{s}: {n}':<{width}}  {status:<5}  {detail}")

    def failed(self) -> bool:
        return any(status in ("FAIL", "error") for _, _, status, _ in self.rows)


def timed_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call (triton.testing.do_bench; CUDA events where triton is missing)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    except ImportError:
        for _ in range(5):
            fn()
        times = []
        for _ in range(30):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------------
# inputs


def packed_doc_ids(tokens: int, mean_len: float = 390.0, max_len: int = 1024, min_pad: int = 1000,
                   seed: int = 0) -> torch.Tensor:
    """doc ids (T,) of a packed batch: documents of log-normal length (sigma 0.8, mean `mean_len` before
    cropping at `max_len`) while they fit below T - min_pad, then padding (-1) to T."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.8
    mu = math.log(mean_len) - sigma ** 2 / 2
    doc = torch.full((tokens,), -1, dtype=torch.long)
    pos = d = 0
    while True:
        n = int(min(max_len, max(1, round(math.exp(mu + sigma * float(torch.randn(1, generator=g)))))))
        if pos + n > tokens - min_pad:
            return doc
        doc[pos:pos + n] = d
        pos, d = pos + n, d + 1


def attention_inputs(doc: torch.Tensor, heads: int, head_dim: int, max_len: int, device: torch.device,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """q, k, v, dout (T, H, D) and the offsets of `doc`, as the varlen back-end builds them."""
    from ..attention import varlen_offsets
    from ..packing import max_docs

    g = torch.Generator().manual_seed(seed)
    T = doc.numel()
    q, k, v, dout = (torch.randn(T, heads, head_dim, generator=g).to(device, dtype) for _ in range(4))
    cu = varlen_offsets(doc.to(device), max_docs(T), max_len)
    return {"q": q, "k": k, "v": v, "dout": dout, "cu": cu, "max_len": max_len, "doc": doc.to(device)}


# ----------------------------------------------------------------------------------------------------
# attention


def fa2_supports_window() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "window_size" in inspect.signature(varlen_attn).parameters


def fa2(q, k, v, cu, max_len: int, window: int = -1) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if 0 < window < max_len:
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(window - 1, window - 1))
    return varlen_attn(q, k, v, cu, cu, max_len, max_len)


def fa4_attn(q, k, v, cu, max_len: int, window: int = -1) -> torch.Tensor:
    return fa4.fa4_varlen(q, k, v, cu, max_len, window)


def forward_backward(fn: Callable, inp: dict, window: int) -> tuple[torch.Tensor, ...]:
    """out, dq, dk, dv of one attention implementation on `inp`."""
    leaves = [inp[n].detach().requires_grad_() for n in ("q", "k", "v")]
    out = fn(*leaves, inp["cu"], inp["max_len"], window)
    return (out.detach(), *torch.autograd.grad(out, leaves, inp["dout"]))


def reference_results(inp: dict, window: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(out, dq, dk, dv) and lse of the fp32 per-document reference."""
    leaves = [inp[n].detach().float().requires_grad_() for n in ("q", "k", "v")]
    out, lse = fa4.reference_varlen(*leaves, inp["cu"], window)
    grads = torch.autograd.grad(out, leaves, inp["dout"].float())
    return (out.detach(), *grads), lse


def check_attention(table: Table, inp: dict, window: int, fa4_ok: bool) -> None:
    """FA4 and FA2 against the fp32 reference: FA4's error may be at most 2x FA2's + 1e-3 (FA4's own
    test rule), or 2 % of the tensor's scale where FA2 has no window argument."""
    section = f"attention{' window ' + str(window) if window > 0 else ''}"
    ref, ref_lse = reference_results(inp, window)
    names = ("out", "dq", "dk", "dv")
    fa2_err: Optional[list[float]] = None
    if window <= 0 or fa2_supports_window():
        try:
            fa2_err = [float((a.float() - r).abs().max()) for a, r in zip(forward_backward(fa2, inp, window), ref)]
            table.add(section, "FA2 vs fp32", "ok", ", ".join(f"{n} {e:.2e}" for n, e in zip(names, fa2_err)))
        except Exception as exc:
            table.add(section, "FA2 vs fp32", "error", one_line(exc))
    if not fa4_ok:
        return
    got = forward_backward(fa4_attn, inp, window)
    err = [float((a.float() - r).abs().max()) for a, r in zip(got, ref)]
    scale = [float(r.abs().max()) for r in ref]
    bound = [2 * e2 + 1e-3 for e2 in fa2_err] if fa2_err else [0.02 * s for s in scale]
    finite = all(bool(torch.isfinite(t).all()) for t in got)
    detail = ", ".join(f"{n} {e:.2e} (<= {b:.2e})" for n, e, b in zip(names, err, bound))
    table.check(section, "FA4 vs fp32", finite and all(e <= b for e, b in zip(err, bound)),
                detail + ("" if finite else "; NON-FINITE values"))
    _, lse = torch.ops.speedrun.fa4_varlen_fwd(inp["q"], inp["k"], inp["v"], inp["cu"], inp["max_len"],
                                               torch.tensor(window), inp["q"].size(-1) ** -0.5)
    lse_err = float((lse - ref_lse.detach()).abs().max())
    table.check(section, "FA4 lse vs fp32", lse_err < 1e-2, f"max |diff| {lse_err:.2e} (natural log)")


def check_padding(table: Table, inp: dict) -> None:
    """Changing the padding's values must leave every document's output bit-identical."""
    pads = inp["doc"] < 0
    v2 = inp["v"].clone()
    v2[pads] += 100.0
    a = fa4_attn(inp["q"], inp["k"], inp["v"], inp["cu"], inp["max_len"])
    b = fa4_attn(inp["q"], inp["k"], v2, inp["cu"], inp["max_len"])
    same = bool(torch.equal(a[~pads], b[~pads]))
    table.check("attention", "FA4 padding isolation", same and bool(torch.isfinite(a).all()),
                f"{int(pads.sum())} padding tokens; documents {'unchanged' if same else 'CHANGED'}")


def check_compiled(table: Table, inp: dict, window: int) -> None:
    """fa4_varlen inside torch.compile(fullgraph=True): no graph break, the eager output and gradients,
    and one graph for every window (the window is a 0-d CPU tensor input)."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()

    def block(q, k, v, w):
        return fa4_attn(q * 1.0, k, v, inp["cu"], inp["max_len"], w) * 2.0

    compiled = torch.compile(block, fullgraph=True)
    err = 0.0
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    for w in (-1, window, window // 2):
        eager = forward_backward(lambda q, k, v, cu, m, _: block(q, k, v, torch.tensor(w)), inp, w)
        got = forward_backward(lambda q, k, v, cu, m, _: compiled(q, k, v, torch.tensor(w)), inp, w)
        err = max(err, *(max_rel_error(a, b) for a, b in zip(got, eager)))  # dq sums atomically: not bitwise
    graphs = dynamo_utils.counters["stats"]["unique_graphs"] - graphs
    table.check("attention", "FA4 under torch.compile(fullgraph)", err < 1e-2 and graphs == 1,
                f"max relative |compiled - eager| {err:.1e} over out, dq, dk, dv; {graphs} graph(s) for windows "
                f"-1, {window}, {window // 2}")


def run_attention_checks(table: Table, doc: torch.Tensor, args, device: torch.device) -> bool:
    """All FA4 checks; returns whether FA4 is usable (for the timings)."""
    ok, why = fa4.available(device)
    if not ok:
        table.add("attention", "FA4", "skip", why)
    else:
        t0 = time.time()
        ok, why = fa4.probe(device, args.heads, args.head_dim, torch.bfloat16, -1, args.max_len, args.tokens)
        table.check("attention", "fa4.probe (JIT compile + self-test)", ok, f"{why} ({time.time() - t0:.1f} s)")
    inp = attention_inputs(doc, args.heads, args.head_dim, args.max_len, device)
    for window in (-1, args.window):
        table.attempt("attention", f"checks, window {window}", lambda: check_attention(table, inp, window, ok))
    if ok:
        table.attempt("attention", "padding", lambda: check_padding(table, inp))
        table.attempt("attention", "compile", lambda: check_compiled(table, inp, args.window))
    return ok


def time_attention(table: Table, doc: torch.Tensor, args, device: torch.device, fa4_ok: bool) -> None:
    inp = attention_inputs(doc, args.heads, args.head_dim, args.max_len, device)
    impls = {"FA2": fa2, **({"FA4": fa4_attn} if fa4_ok else {})}
    for window in (-1, args.window):
        if window > 0 and not fa2_supports_window():
            impls_w = {k: f for k, f in impls.items() if k != "FA2"}
        else:
            impls_w = impls
        base: dict[str, float] = {}
        for name, fn in impls_w.items():
            label = f"{name}{' window ' + str(window) if window > 0 else ''}"

            def run_one(name=name, fn=fn, label=label) -> str:
                fwd = timed_ms(lambda: fn(inp["q"], inp["k"], inp["v"], inp["cu"], inp["max_len"], window))
                both = timed_ms(lambda: forward_backward(fn, inp, window))
                base.setdefault("fwd", fwd)
                base.setdefault("both", both)
                return (f"fwd {fwd:.3f} ms ({base['fwd'] / fwd:.2f}x), fwd+bwd {both:.3f} ms "
                        f"({base['both'] / both:.2f}x vs {next(iter(impls_w))})")

            table.attempt("time attention", label, run_one)


# ----------------------------------------------------------------------------------------------------
# QK norm + RoPE


def rope_inputs(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                seed: int = 1) -> dict:
    """A (T, 3, H, D) QKV output (q and k are its strided views, as in Attention.forward), a value
    embedding, output gradients, and the model's RoPE tables."""
    from ..models.unet import Rotary

    g = torch.Generator().manual_seed(seed)
    qkv, ve, gq, gk, gv = ((torch.randn(tokens, *shape, heads, head_dim, generator=g) * 2 + 0.3).to(device, dtype)
                           for shape in ((3,), (), (), (), ()))
    cos, sin = Rotary(head_dim, 10000.0).to(device)(tokens, dtype)
    lambdas = torch.tensor([0.6, 0.45], device=device)  # not powers of two: the products round
    return {"qkv": qkv, "ve": ve, "gq": gq, "gk": gk, "gv": gv, "rope": (cos, sin), "lambdas": lambdas}


def eager_pair(q: torch.Tensor, k: torch.Tensor, rope_tables) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's formula (speedrun.models.unet.Attention.forward)."""
    from ..models.unet import apply_rotary, norm

    return apply_rotary(norm(q), rope_tables), apply_rotary(norm(k), rope_tables)


def pair_grads(fn: Callable, inp: dict, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
    """yq, yk, dq, dk of `fn(q, k, rope)` with q, k views of the QKV output (cast to `dtype` first)."""
    qkv = inp["qkv"] if dtype is None else inp["qkv"].to(dtype)
    qkv = qkv.detach().requires_grad_()
    tables = tuple(t if dtype is None else t.to(dtype) for t in inp["rope"])
    q, k, _ = qkv.unbind(1)
    yq, yk = fn(q, k, tables)
    gq, gk = (inp[n] if dtype is None else inp[n].to(dtype) for n in ("gq", "gk"))
    dq, dk = torch.autograd.grad((yq, yk), (q, k), (gq, gk))
    return yq.detach(), yk.detach(), dq, dk


def versus_fp32(table: Table, section: str, label: str, names: tuple[str, ...], got, eager, truth) -> None:
    """A kernel's results (in the inputs' dtype) against the formula in fp32 on the same inputs: within
    one ulp everywhere (the lambdas' gradient, an fp32 sum over T x d products: within 1e-3 relative).
    The eager chain's errors are shown for scale (it rounds after each step)."""
    parts, passed = [], True
    for name, g, e, t in zip(names, got, eager, truth):
        if name == "dlambdas":
            ok, rne = max_rel_error(g, t) <= 1e-3, float("nan")
        else:
            ok, rne = rope.within_one_ulp(g, t)
        passed &= ok
        err, eager_err = float((g.float() - t).abs().max()), float((e.float() - t).abs().max())
        parts.append(f"{name} {err:.1e} (eager {eager_err:.1e}{'' if rne != rne else f', RNE {rne:.3f}'})")
    table.check(section, label, passed, ", ".join(parts))


def mix_grads(fn: Callable, inp: dict, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, ...]:
    """q, k, v and the gradients of qkv, ve, lambdas of `fn(qkv, ve, lambdas, rope)`."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    leaves = [cast(inp[n]).detach().requires_grad_() for n in ("qkv", "ve")]
    leaves.append(inp["lambdas"].detach().requires_grad_())
    outs = fn(*leaves, tuple(cast(t) for t in inp["rope"]))
    grads = torch.autograd.grad(outs, leaves, tuple(cast(inp[n]) for n in ("gq", "gk", "gv")))
    return (*(o.detach() for o in outs), *grads)


def eager_mix(qkv, ve, lambdas, tables):
    return qkv_prep(eager_pair)(qkv, ve, lambdas, *tables)


def check_rope(table: Table, inp: dict, dtype: torch.dtype) -> None:
    """Both kernels (qk_norm_rope on the q, k views; qkv_norm_rope_mix on the QKV output) against fp32."""
    section = f"rope {str(dtype).replace('torch.', '')}"
    if not rope._use_triton(inp["qkv"]):
        why = rope._triton_error or "no CUDA and no TRITON_INTERPRET=1"
        table.add(section, "triton kernels", "skip", f"the eager formula runs here ({why})")
        return
    versus_fp32(table, section, "qk_norm_rope vs fp32 (1 ulp)", ("yq", "yk", "dq", "dk"),
                pair_grads(rope.qk_norm_rope, inp), pair_grads(eager_pair, inp),
                pair_grads(eager_pair, inp, torch.float32))
    versus_fp32(table, section, "qkv_norm_rope_mix vs fp32 (1 ulp)", ("q", "k", "v", "dqkv", "dve", "dlambdas"),
                mix_grads(rope.qkv_norm_rope_mix, inp), mix_grads(eager_mix, inp),
                mix_grads(eager_mix, inp, torch.float32))


def qkv_prep(rope_fn: Callable) -> Callable:
    """Attention.forward between the QKV GEMM and attention: unbind, value mix, QK norm + RoPE."""
    def prep(qkv, ve, lambdas, cos, sin):
        q, k, v = qkv.unbind(1)
        v = lambdas[0] * v + lambdas[1] * ve
        q, k = rope_fn(q, k, (cos, sin))
        return q, k, v
    return prep


def time_rope(table: Table, inp: dict) -> None:
    """The op alone (grads with respect to the q and k views), then the whole QKV preparation compiled
    as the model's block would compile it (grads with respect to the QKV output, the value embedding
    and the lambdas), Inductor alone vs Inductor around the op."""
    from ..kernels import _rope_triton

    compiled_pair = torch.compile(eager_pair)
    both = {"compiled": compiled_pair, "triton": rope.qk_norm_rope}
    base: dict[str, float] = {}
    for name, fn in both.items():
        def run_one(fn=fn) -> str:
            q, k, _ = inp["qkv"].unbind(1)
            fwd = timed_ms(lambda: fn(q, k, inp["rope"]))
            fb = timed_ms(lambda: pair_grads(fn, inp))
            base.setdefault("fwd", fwd)
            base.setdefault("fb", fb)
            return f"fwd {fwd:.3f} ms ({base['fwd'] / fwd:.2f}x), fwd+bwd {fb:.3f} ms ({base['fb'] / fb:.2f}x)"
        table.attempt("time rope (q, k views)", name, run_one)
    default_tile = _rope_triton.TILE
    for tile in (512, 1024, 2048, 4096):
        _rope_triton.TILE = tile
        table.attempt("time rope (q, k views)", f"triton TILE={tile}",
                      lambda: f"fwd+bwd {timed_ms(lambda: pair_grads(rope.qk_norm_rope, inp)):.3f} ms")
    _rope_triton.TILE = default_tile
    time_prep(table, inp)


def time_prep(table: Table, inp: dict) -> None:
    """Unbind + value mix + QK norm + RoPE, compiled as in the model's block: Inductor alone, Inductor
    around qk_norm_rope (whose separate dq, dk Inductor must copy into the QKV gradient), and the fused
    qkv_norm_rope_mix (which writes that gradient itself)."""
    base: dict[str, float] = {}
    variants = (("inductor", eager_mix), ("inductor + qk_norm_rope", lambda a, b, c, t: qkv_prep(rope.qk_norm_rope)(
        a, b, c, *t)), ("qkv_norm_rope_mix", rope.qkv_norm_rope_mix))
    for name, fn in variants:
        prep = torch.compile(fn)

        def run_one(prep=prep) -> str:
            fwd = timed_ms(lambda: prep(inp["qkv"], inp["ve"], inp["lambdas"], inp["rope"]))
            both = timed_ms(lambda: mix_grads(prep, inp))
            base.setdefault("fwd", fwd)
            base.setdefault("both", both)
            return f"fwd {fwd:.3f} ms ({base['fwd'] / fwd:.2f}x), fwd+bwd {both:.3f} ms ({base['both'] / both:.2f}x)"
        table.attempt("time qkv prep (compiled block part)", name, run_one)


# ----------------------------------------------------------------------------------------------------


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m speedrun.bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-len", type=int, default=1024, help="document crop = varlen segment bound")
    p.add_argument("--window", type=int, default=256, help="the sliding window of the windowed checks")
    p.add_argument("--no-time", action="store_true", help="checks only")
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def guarded(table: Table, section: str, fn: Callable[[], object], default: object = None) -> object:
    """fn(), or `default` and an error row when it raises (so the table always prints)."""
    try:
        return fn()
    except Exception as exc:
        table.add(section, "setup", "error", one_line(exc))
        return default


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    table = Table()
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if on_gpu else device}, "
          f"{args.tokens} tokens, {args.heads} heads x {args.head_dim}", flush=True)
    doc = packed_doc_ids(args.tokens, max_len=args.max_len)
    lengths = torch.bincount(doc[doc >= 0])
    table.add("batch", "documents", "info", f"{lengths.numel()} documents, mean {lengths.float().mean():.0f}, "
              f"max {int(lengths.max())}, {int((doc < 0).sum())} padding tokens")
    fa4_ok = False
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references stay fp32
        fa4_ok = guarded(table, "attention", lambda: run_attention_checks(table, doc, args, device), False)
    else:
        table.add("attention", "FA2 / FA4", "skip", f"attention checks need a CUDA device, not {device}")
    for dtype in (torch.bfloat16, torch.float32):
        section = f"rope {str(dtype).replace('torch.', '')}"
        guarded(table, section, lambda: check_rope(
            table, rope_inputs(args.tokens, args.heads, args.head_dim, dtype, device), dtype))
    if on_gpu and not args.no_time:
        guarded(table, "time attention", lambda: time_attention(table, doc, args, device, fa4_ok))
        if rope._use_triton(torch.empty(1, 1, args.head_dim, device=device)):
            guarded(table, "time rope", lambda: time_rope(
                table, rope_inputs(args.tokens, args.heads, args.head_dim, torch.bfloat16, device)))
    table.print()
    return 1 if table.failed() else 0

if __name__ == "__main__":
    sys.exit(main())

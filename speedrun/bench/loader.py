"""Loader throughput: `python -m speedrun.bench.loader [Hydra overrides] [--tokens T] [--seconds S]`.

    python -m speedrun.bench.loader data=swissprot2014 data.root=/work/data
    python -m speedrun.bench.loader data=local data.path=DIR --tokens 65536 --world 8

Measures the loader alone, on the train shards of the composed data config, the way a rank uses it:
`TrainStream.next_batch` (UNet / transformer path) and `RowStream.next_batch` (Patch-UNet path) in
this process, then the `Prefetcher` on the CPU (the thread hand-off the trainer pays). Every figure
is tokens per second *per rank* from one worker (padding included: it is what the model consumes),
after a warm-up that maps the shards, so it is the steady state, not the page-cache fill. The
target is >= 5 M tokens/s per rank: a GPU training the reference UNet eats well under 1 M.
"""
from __future__ import annotations

import argparse
import json
import sys
import time



def _rate(make_batch, seconds: float, warmup: float) -> dict:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warmup:
        make_batch()
    n_batches, n_tokens, n_real = 0, 0, 0
    t0 = time.perf_counter()
    while True:
        tokens, doc_ids = make_batch()[:2]
        n_batches += 1
        n_tokens += tokens.numel() if hasattr(tokens, "numel") else tokens.size
        n_real += int((doc_ids >= 0).sum())
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return {"tokens_per_s": n_tokens / elapsed, "batches_per_s": n_batches / elapsed,
            "ms_per_batch": 1e3 * elapsed / n_batches, "fill": n_real / n_tokens, "batches": n_batches}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m speedrun.bench.loader", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=local data.path=DIR")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per batch per rank (default 65536, "
                    "the reference micro-batch)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per loader (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="untimed warm-up per loader (default 1)")
    ap.add_argument("--world", type=int, default=1, help="pretend to be rank 0 of this many ranks")
    ap.add_argument("--only", choices=("flat", "rows", "prefetch"), action="append",
                    help="measure only these (repeatable)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    a = ap.parse_args(argv)

    from ..data import data_files
    from ..compose import compose
    from ..data.shards import read_header
    from ..errors import SpeedrunError

    try:
        cfg = compose(a.overrides)
        files = data_files(cfg.data, "train")
    except SpeedrunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from ..data.loader import Prefetcher, RowStream, TrainStream

    L = cfg.data.max_length
    shard_tokens = sum(read_header(f) for f in files)
    out = {"data": cfg.data.name, "path": str(files[0].parent), "train_shards": len(files),
           "train_tokens": shard_tokens, "tokens_per_batch": a.tokens, "max_length": L, "world": a.world,
           "torch_threads": torch.get_num_threads()}
    which = a.only or ["flat", "rows", "prefetch"]
    t0 = time.perf_counter()
    first = TrainStream(files, a.tokens, L, cfg.data.seed, 0, a.world)
    first.next_batch()
    out["first_batch_s"] = time.perf_counter() - t0  # opening a shard: map it, find its documents
    if "flat" in which:
        st = TrainStream(files, a.tokens, L, cfg.data.seed, 0, a.world)
        out["TrainStream"] = _rate(st.next_batch, a.seconds, a.warmup)
    if "rows" in which:
        rs = RowStream(files, a.tokens, L, cfg.data.seed, 0, a.world)
        out["RowStream"] = _rate(rs.next_batch, a.seconds, a.warmup)
    if "prefetch" in which:
        pf = Prefetcher(TrainStream(files, a.tokens, L, cfg.data.seed, 0, a.world), torch.device("cpu"),
                        depth=cfg.data.prefetch)
        try:
            out["Prefetcher(cpu)"] = _rate(pf.next, a.seconds, a.warmup)
        finally:
            pf.close()
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['data']}: {len(files)} train shard(s), {shard_tokens:,} tokens in {out['path']}; "
          f"batch {a.tokens:,} tokens, max_length {L}, rank 0 of {a.world}; first batch {out['first_batch_s']:.2f} s")
    for k in ("TrainStream", "RowStream", "Prefetcher(cpu)"):
        if k in out:
            r = out[k]
            print(f"  {k:16s} {r['tokens_per_s'] / 1e6:8.1f} M tokens/s per rank  ({r['ms_per_batch']:.2f} ms/batch, "
                  f"{100 * r['fill']:.1f} % real tokens, {r['batches']} batches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

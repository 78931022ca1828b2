#!/usr/bin/env bash
# This round's H200 work as device-tool steps, one call each, issued back to back (a machine stays ours
# for 30 s after a call; what a call leaves under /root and /tmp survives into the next one):
#
#   step       carry              what
#   fa4a       .fa4a              first part of the FlashAttention-4 wheels -> /root/fa4; what the card is
#   setup      .fa4b .whl         install FA4 + hydra-core/omegaconf/submitit into /tmp/site; the kernel
#                                 checks and timings (python -m speedrun.bench.kernels); the CUDA tests
#   bench      .h200data          Swiss-Prot shards -> /root/data; throughput variants; parity
#   sweeps S   -                  the ablation sweeps for seed S into /root/sweeps/ablations (docs/results/)
#
#   bash ../shared/tools/gpu/fa4_wheels.sh      # here, once: fills .fa4a/ .fa4b/ (wheels: .whl/)
#   device run: bash scripts/h200/session.sh fa4a | setup | bench | sweeps 0 | sweeps 1
# Everything a step measures lands in $OUT (logs, JSON, a tarball of the sweep runs' small files).
set -uo pipefail
step=${1:?step: fa4a | setup | bench | sweeps SEED}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 OMP_NUM_THREADS=8
export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export SPEEDRUN_DATA=/root/data SPEEDRUN_CACHE=/root/cache TORCHINDUCTOR_CACHE_DIR=/root/inductor
PY=python3
BASE="model=unet optimizer=muon hardware=gpu data=swissprot2014"

table() {  # the bench JSONs as one short table
  $PY - "$@" <<'PYEOF'
import json, sys
print(f"{'variant':<16} {'attention':<8} {'tok/s':>9} {'step ms':>8} {'first s':>7} {'peak GiB':>8} {'recompiles':>10}")
for path in sys.argv[1:]:
    try:
        r = json.load(open(path))
    except Exception as exc:
        print(f"{path.split('/')[-1]:<16} failed: {exc}"); continue
    print(f"{path.split('bench_')[-1][:-5]:<16} {r['attention']:<8} {r['tokens_per_s']:>9,.0f} {r['step_ms_median']:>8.1f} "
          f"{r['time_to_first_step_s'] or 0:>7.1f} {r['peak_memory_gib'] or 0:>8.1f} {str(r['recompiles_after_first_step']):>10}")
PYEOF
}

case "$step" in
fa4a)
  mkdir -p /root/fa4 && cp .fa4a/* /root/fa4/
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  $PY -c "import torch, inspect; from torch.nn.attention.varlen import varlen_attn as v; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| varlen window_size:', 'window_size' in inspect.signature(v).parameters)"
  ;;
setup)
  source .fa4b/install.sh || exit 1
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  timeout 300 $PY -m speedrun.bench.kernels 2>&1 | tee "$OUT/kernels.log"
  timeout 200 $PY -m pytest -q -p no:cacheprovider -rs tests/test_attention.py tests/test_kernels.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
  ;;
bench)
  mkdir -p /root/data && cp -r .h200data/swissprot2014 /root/data/
  for v in "default:" "fa2:model.attention=varlen" "triton_rope:hardware.triton_rope=true" \
           "crop_false:data.crop=false"; do
    name=${v%%:*}; extra=${v#*:}
    timeout 240 $PY -m speedrun.bench $BASE $extra bench.out="$OUT/bench_$name.json" > "$OUT/bench_$name.log" 2>&1 \
      || tail -5 "$OUT/bench_$name.log"
  done
  timeout 150 $PY -m speedrun.bench.parity $BASE parity.eager_attention=varlen parity.out="$OUT/parity.json" \
    > "$OUT/parity.log" 2>&1; tail -4 "$OUT/parity.log"
  table "$OUT"/bench_*.json
  ;;
sweeps)
  seed=${2:?seed}
  S="$PY launch.py experiment=ablation_h200 hydra.sweep.dir=/root/sweeps/ablations log.progress=plain log.print_config=false seed=$seed"
  start=$SECONDS
  for sweep in architectures optimizers tied_heads "diffusion_schedules +diffusion_schedule=mlm,diffusion" whole_proteins; do
    left=$((540 - (SECONDS - start)))  # a device call ends at 10 minutes: a sweep that would not fit waits
    if [ "$left" -lt 90 ]; then echo "not run (time): sweep=$sweep seed=$seed"; continue; fi
    timeout "$left" $S sweep=$sweep >> "$OUT/sweeps_$seed.log" 2>&1 || echo "sweep $sweep: exit $?"
  done
  (cd /root/sweeps && find ablations -name summary.json -o -name metrics.jsonl -o -name run.json \
     -o -name reproduce.yaml -o -path '*/.hydra/overrides.yaml' -o -name multirun.yaml | tar czf "$OUT/sweeps.tgz" -T -)
  $PY - <<'PYEOF'
import glob, json
for p in sorted(glob.glob("/root/sweeps/ablations/*/summary.json")):
    s = json.load(open(p)); c = json.load(open(p.replace("summary.json", "run.json")))["config"]
    print(f"{p.split('/')[-2]:<14} {c['model']['arch']:<11} {c['optimizer']['name']:<6} tie={c['model'].get('tie_embeddings')!s:<5} "
          f"{c['objective']['name']:<9} crop={c['data']['crop']!s:<5} seed={c['seed']} {s['status']:<6} "
          f"val {s.get('val_loss') or float('nan'):.4f} ± {s.get('val_loss_stderr') or float('nan'):.4f}  "
          f"{s.get('tokens_per_s') or 0:,.0f} tok/s  {s.get('train_seconds') or 0:.0f} s")
PYEOF
  ;;
*) echo "unknown step $step"; exit 2 ;;
esac

"""The typed configuration schema of a run.

Every Hydra config group (`conf/model`, `conf/optimizer`, ...) fills one of the dataclasses below.
The composed Hydra config is merged onto `RunConfig` with OmegaConf's structured-config machinery,
so an unknown key or a value of the wrong type fails *before anything runs*, naming the key. The
trainer then receives plain dataclass objects (never a DictConfig) and never imports Hydra.

This module imports only the standard library and omegaconf: `launch.py --help` and every Hydra
composition stay fast, and the schema pickles cleanly into SLURM jobs and spawned ranks.

Cross-field rules live in `validate()`, which raises `ConfigError` with a one-line message that
names the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List, Optional

MODEL_ARCHS = ("unet", "transformer", "patch_unet")
OPTIMIZERS = ("muon", "adamw")
OBJECTIVES = ("mlm", "diffusion", "mlm_to_diffusion")
RAMPS = ("step", "linear")
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("auto", "varlen", "flex", "sdpa")
HEADS = ("mlp", "linear")
RESUME = ("auto", "never", "must")
LOGGERS = ("auto", "none", "wandb")
PROGRESS = ("auto", "bar", "plain")


from .errors import ConfigError  # noqa: E402,F401  (re-exported: a configuration that cannot run)


@dataclass
class ModelConfig:
    arch: str = "unet"  # unet | transformer (plain ESM-style stack)
    dim: int = 768
    n_layers: int = 24
    n_heads: int = 6
    mlp_ratio: float = 8 / 3  # hidden = ceil(mlp_ratio * dim / mlp_multiple) * mlp_multiple
    mlp_multiple: int = 256
    vocab_size: int = 33
    value_embeddings: bool = True  # UNet only: one table per encoder layer, reused by its decoder twin
    tie_embeddings: bool = False  # LM-head decoder shares the token-embedding matrix
    head: str = "mlp"  # mlp: dense->GELU->decoder+bias (current reference); linear: zero-init d x V (Dec-2024)
    soft_cap: float = 32.0  # tanh logit soft-cap c*tanh(z/c); 0 disables
    token_dropout: bool = True  # zero the <mask> embedding (ESM-style; the rescale is cancelled by the norm)
    rope_base: float = 10000.0
    attention: str = "auto"  # auto: varlen FlashAttention or FlexAttention on CUDA, SDPA elsewhere (one mask rule)
    # Patch-UNet (arch=patch_unet, RECIPE.md §4.4): n_layers UNet levels (half encoder, half decoder)
    # over (B, L) rows with L = data.max_length, then n_extra_layers full-resolution blocks
    n_extra_layers: int = 0


@dataclass
class OptimizerConfig:
    name: str = "muon"  # muon (hidden matrices) + Adam groups | adamw (everything)
    # Muon for >=2-D hidden matrices
    lr_hidden: float = 0.05
    momentum: float = 0.95
    momentum_warmup_start: float = 0.85
    momentum_warmup_steps: int = 300
    nesterov: bool = True
    ns_steps: int = 5
    # Adam groups that go with Muon (embeddings / head / scalars)
    lr_embed: float = 0.06
    lr_head: float = 0.008
    lr_scalar: float = 0.04
    betas: List[float] = field(default_factory=lambda: [0.8, 0.95])
    eps: float = 1e-8
    # AdamW for everything (optimizer=adamw)
    lr: float = 1e-3
    weight_decay: float = 0.0
    # schedule: multiplier on every group's lr
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay, linear decay) | constant
    warmup_steps: int = 1000
    muon_warmup: bool = False  # the reference gives Muon no warm-up
    cooldown_frac: float = 0.2  # wsd: fraction of steps in the final linear decay
    min_lr_frac: float = 0.0  # floor of the multiplier at the end of the schedule
    grad_clip: float = 0.0  # clip the global grad norm to this value; 0 = off


@dataclass
class ObjectiveConfig:
    name: str = "mlm"  # mlm | diffusion (DSM masked diffusion) | mlm_to_diffusion
    mask_rate: float = 0.2  # MLM rate (and the MLM phase of mlm_to_diffusion)
    mask_rate_start: Optional[float] = None  # with mask_rate_steps: linear schedule start -> mask_rate
    mask_rate_steps: int = 0
    replace: bool = False  # 80/10/10 (<mask>/random/unchanged) instead of <mask>-only (MLM only)
    eps: float = 1e-3  # diffusion: t ~ U(eps, 1) per sequence
    warmup_steps: int = 0  # mlm_to_diffusion: steps of pure MLM before the ramp
    ramp: str = "linear"  # mlm_to_diffusion: step (switch at once) | linear (over ramp_steps)
    ramp_steps: int = 0  # mlm_to_diffusion: length of the linear ramp from MLM to diffusion
    eval_levels: List[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # diffusion eval


@dataclass
class DataConfig:
    name: str = "sample"  # the embedded Swiss-Prot 2014 sample, or a shard-folder dataset
    path: Optional[str] = None  # folder of *_train_*.bin / *_valid_*.bin / *_test_*.bin shards
    max_length: int = 1024  # training crop length in tokens (specials included); long docs are cropped
    seed: int = 0  # data order (per-epoch reshuffle)
    prefetch: int = 2  # batches prepared ahead by the background loader thread
    # where downloaded / prepared datasets live; the dataset configs set path: ${data.root}/<folder>
    root: str = "data"  # conf/data/*.yaml: ${oc.env:SPEEDRUN_DATA,data} (relative to the working directory)
    # published packed shards (data=omgprot50 | uniref50 | og_prot90): python -m speedrun.data download data=...
    repo: Optional[str] = None  # Hugging Face dataset repo, e.g. Synthyra/omg_prot50_packed (null: not on the hub)
    file_prefix: Optional[str] = None  # shard names {file_prefix}_{split}_{index:06d}.bin, e.g. omg_prot50
    num_chunks: int = 0  # train shards (~1e8 tokens each) to download and train on; 0 = every one there is
    revision: Optional[str] = None  # hub branch / tag / commit to download (null = main)


@dataclass
class HardwareConfig:
    device: str = "auto"  # auto | cpu | cuda
    gpus: int = 1  # ranks on this node (spawned by launch.py)
    precision: str = "fp32"  # fp32 | bf16 (bf16 activations, fp32 master weights)
    compile: bool = False
    compile_scope: str = "blocks"  # blocks: each block (one graph for all layers, fast compile) | model
    memory_budget: float = 1.0  # torch.compile activation memory budget in (0, 1]: < 1 recomputes cheap ops to save memory
    fp8: bool = False  # FP8 GEMMs (dynamic per-tensor scales) for the blocks' matrices; needs precision=bf16
    micro_batch_tokens: int = 4096  # tokens per rank per forward/backward
    grad_accum: Optional[int] = None  # derived from train.batch_tokens when null
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = leave as is
    warmup_steps: int = 0  # untimed compile warm-up steps (state restored afterwards)


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_tokens: Optional[int] = None  # global tokens per optimizer step; null = micro x accum x ranks
    log_every: int = 10
    window_start: int = 1024  # sliding-window schedule: window_start -> window_end tokens, multiples of 128
    window_end: Optional[int] = None  # null = data.max_length
    max_minutes: float = 0.0  # stop training after this much train time (0 = no limit)
    stop_at_target: bool = False  # end the run when validation first reaches target_loss
    max_params: Optional[int] = None  # refuse a model with more parameters (e.g. the speed track's 150M)
    max_bad_steps: int = 5  # stop (status failed) after this many consecutive non-finite steps


@dataclass
class EvalConfig:
    every_steps: int = 100  # 0 = only at the end
    mask_rate: float = 0.15
    seed: int = 1234  # the same masks at every evaluation
    max_tokens: int = 0  # cap on validation tokens per evaluation (0 = whole split)
    batch_tokens: int = 0  # tokens per eval forward (0 = hardware.micro_batch_tokens)
    test: bool = False  # also evaluate the test split at the end
    # representation probes during training (speedrun/probe/ `run_probes`; off by default)
    probe_every: int = 0  # steps between probe runs (0 = off)
    probe_tasks: List[str] = field(default_factory=lambda: ["ss3", "meltome", "solubility"])  # names, NAME@PATH, task YAMLs
    probe_layers: str = "all"  # all | last | comma-separated layer ids, e.g. "0,6,12" (0 = input embedding)
    probe_max_sequences: int = 500  # sequences per split (fast subset; 0 = all)
    probe_max_residues: int = 20000  # sampled residues per split for per-residue tasks (0 = all)
    probe_data_dir: Optional[str] = None  # folder of the FLIP zips; null = $SPEEDRUN_PROBE_DATA or the machines' default


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = only the final checkpoint
    keep_last: int = 2
    final: bool = True
    every_minutes: float = 0.0  # also save when this much wall time passed since the last checkpoint; 0 = off


@dataclass
class LogConfig:
    progress: str = "auto"  # auto: a progress bar on a terminal, plain lines otherwise | bar | plain
    wandb_project: str = "speedrun-plm"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None  # default: the sweep name in multirun
    print_config: bool = True  # print the resolved config as a tree at start (rank 0)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    name: str = "default"
    seed: int = 0
    dry_run: bool = False
    target_loss: Optional[float] = None  # record train time and tokens when val loss first reaches it
    resume: str = "auto"  # auto: continue from the run dir's newest checkpoint; never; must
    logger: str = "auto"  # auto: W&B when WANDB_API_KEY is set | none | wandb


def _choice(value: str, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}: set {key} to one of them")


def mlp_hidden(m: ModelConfig) -> int:
    """Hidden width of the MLP: ceil(r*d/multiple)*multiple, as the reference's correction_fn."""
    return int(math.ceil(m.mlp_ratio * m.dim / m.mlp_multiple - 1e-9)) * m.mlp_multiple


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that a structured config cannot express. Raises ConfigError."""
    m, o, ob, d, h, t, e = cfg.model, cfg.optimizer, cfg.objective, cfg.data, cfg.hardware, cfg.train, cfg.eval
    _choice(m.arch, MODEL_ARCHS, "model.arch")
    _choice(m.head, HEADS, "model.head")
    _choice(m.attention, ATTENTION, "model.attention")
    _choice(o.name, OPTIMIZERS, "optimizer.name")
    _choice(o.schedule, SCHEDULES, "optimizer.schedule")
    _choice(ob.name, OBJECTIVES, "objective.name")
    _choice(h.precision, PRECISIONS, "hardware.precision")
    _choice(h.device, DEVICES, "hardware.device")
    _choice(h.compile_scope, ("blocks", "model"), "hardware.compile_scope")
    if not 0.0 < h.memory_budget <= 1.0:
        raise ConfigError(f"hardware.memory_budget={h.memory_budget} must be in (0, 1] (1 = save every activation "
                          "the compiler wants; lower trades recompute for memory)")
    if h.fp8 and h.precision != "bf16":
        raise ConfigError("hardware.fp8=true needs hardware.precision=bf16 (FP8 GEMMs take bf16 activations)")
    if h.fp8 and h.micro_batch_tokens % 16:
        raise ConfigError(f"hardware.fp8=true needs hardware.micro_batch_tokens divisible by 16 (got {h.micro_batch_tokens})")
    _choice(cfg.resume, RESUME, "resume")
    _choice(cfg.logger, LOGGERS, "logger")
    _choice(cfg.log.progress, PROGRESS, "log.progress")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}: change one of them")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"head dim {m.dim // m.n_heads} must be even for RoPE: change model.dim or model.n_heads")
    if m.arch == "unet" and m.n_layers % 2:
        raise ConfigError(f"model.arch=unet needs an even model.n_layers (got {m.n_layers})")
    if m.vocab_size < 33:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the 33-token ESM vocabulary")
    if m.tie_embeddings and m.head == "linear":
        raise ConfigError("model.tie_embeddings=true needs model.head=mlp (the linear head is zero-initialised)")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optimizer.betas={list(o.betas)} must be two numbers in [0, 1)")
    if not 0.0 <= o.cooldown_frac <= 1.0:
        raise ConfigError(f"optimizer.cooldown_frac={o.cooldown_frac} must be in [0, 1]")
    for key in ("mask_rate",):
        if not 0.0 < getattr(ob, key) < 1.0:
            raise ConfigError(f"objective.{key}={getattr(ob, key)} must be in (0, 1)")
    _choice(ob.ramp, RAMPS, "objective.ramp")
    if not 0.0 < ob.eps < 1.0:
        raise ConfigError(f"objective.eps={ob.eps} must be in (0, 1)")
    if ob.replace and ob.name != "mlm":
        raise ConfigError("objective.replace=true (80/10/10) applies to objective=mlm only: drop it or use mlm")
    if any(not 0.0 < lv < 1.0 for lv in ob.eval_levels):
        raise ConfigError(f"objective.eval_levels={list(ob.eval_levels)} must all be in (0, 1)")
    if ob.mask_rate_start is not None and not 0.0 < ob.mask_rate_start < 1.0:
        raise ConfigError(f"objective.mask_rate_start={ob.mask_rate_start} must be in (0, 1)")
    if not 0.0 < e.mask_rate < 1.0:
        raise ConfigError(f"eval.mask_rate={e.mask_rate} must be in (0, 1)")
    if e.probe_every > 0 and m.arch not in ("unet", "transformer"):  # speedrun.embed's layer-wise states
        raise ConfigError(f"eval.probe_every={e.probe_every} needs per-layer embeddings, which model.arch={m.arch} "
                          "does not provide (unet and transformer do): set eval.probe_every=0 or change model.arch")
    if d.max_length < 8:
        raise ConfigError(f"data.max_length={d.max_length} is too small: use at least 8 tokens")
    if h.micro_batch_tokens < d.max_length:
        raise ConfigError(f"hardware.micro_batch_tokens={h.micro_batch_tokens} is smaller than data.max_length="
                          f"{d.max_length}: raise the micro-batch or lower data.max_length")
    if h.gpus < 1:
        raise ConfigError(f"hardware.gpus={h.gpus} must be at least 1")
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 0")
    if t.window_start < 1:
        raise ConfigError(f"train.window_start={t.window_start} must be positive")
    if not cfg.checkpoint.every_minutes >= 0:  # also rejects NaN
        raise ConfigError(f"checkpoint.every_minutes={cfg.checkpoint.every_minutes} must be >= 0 (0 = off)")
    if d.name != "sample" and not d.path:
        raise ConfigError(f"data={d.name} needs a shard folder: pass data.path=DIR")
    return cfg


def batch_geometry(cfg: RunConfig, world_size: int) -> dict:
    """Resolve tokens per micro-batch, gradient accumulation and the global batch for `world_size` ranks.

    The global batch is a token count; accumulation is derived from it, the ranks and the micro-batch:
    524,288 / 4 ranks / 65,536 = 2 micro-steps (the reference README's arithmetic).
    """
    micro = cfg.hardware.micro_batch_tokens
    accum = cfg.hardware.grad_accum
    total = cfg.train.batch_tokens
    if total is None:
        accum = accum or 1
        total = micro * accum * world_size
    else:
        per_step = micro * world_size
        if total % per_step:
            raise ConfigError(
                f"train.batch_tokens={total} is not divisible by hardware.micro_batch_tokens={micro} x {world_size} "
                f"rank(s) = {per_step}: change train.batch_tokens or hardware.micro_batch_tokens")
        derived = total // per_step
        if accum is not None and accum != derived:
            raise ConfigError(
                f"hardware.grad_accum={accum} disagrees with train.batch_tokens={total} / ({micro} x {world_size} "
                f"ranks) = {derived}: set hardware.grad_accum=null or fix the numbers")
        accum = derived
    return {"micro_batch_tokens": micro, "grad_accum": accum, "world_size": world_size, "batch_tokens": total}


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for JSON and YAML)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    return obj


def from_container(container: Any) -> RunConfig:
    """Merge a composed config (DictConfig or dict) onto the schema and return typed dataclasses.

    Unknown keys and wrong types raise ConfigError naming the key; cross-field rules run too.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(RunConfig)
    try:
        if not isinstance(container, dict):  # a DictConfig: resolve everything but Hydra's own node
            container = {k: (OmegaConf.to_container(container[k], resolve=True)
                             if OmegaConf.is_config(container[k]) else container[k])
                         for k in container if k != "hydra"}
        container = {k: v for k, v in container.items() if k != "hydra"}
        merged = OmegaConf.merge(schema, container)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    return validate(cfg)


def _omegaconf_message(exc: Exception) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "not in struct" in str(exc) or "Key '" in msg and "not" in msg:
        return f"unknown config key '{key}': check the spelling (python launch.py --cfg job lists every key)"
    return f"bad value for '{key}': {msg}"


def register_schema() -> None:
    """Register `RunConfig` with Hydra's ConfigStore as `schema`, so composition is type-checked."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=RunConfig)


# ---- command-line pre-check: one-line errors with a suggestion, before Hydra composes anything ----
GROUPS = ("model", "optimizer", "objective", "data", "hardware", "experiment", "sweep")


def _schema_keys(cls=RunConfig, prefix: str = "") -> dict:
    """Flattened 'a.b' -> field type of the schema."""
    import typing

    out = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if is_dataclass(t):
            out.update(_schema_keys(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


def _convert(value: Any, t) -> None:
    import typing

    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if type(None) in typing.get_args(t):
            return
        raise ValueError("null is not allowed here")
    args = [a for a in typing.get_args(t) if a is not type(None)]
    base = args[0] if typing.get_origin(t) is typing.Union and args else t
    if typing.get_origin(base) in (list, List):
        return
    if base is bool:
        if not isinstance(value, bool) and str(value).lower() not in ("true", "false"):
            raise ValueError("expected true or false")
    elif base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        try:
            int(value)
        except ValueError:
            raise ValueError("expected an integer") from None
    elif base is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            float(value)
        except ValueError:
            raise ValueError("expected a number") from None


def check_overrides(args: list[str], conf_dir: str) -> Optional[str]:
    """Return a one-line error for the first bad `key=value` / `group=option` override, else None."""
    import difflib
    import os

    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import ChoiceSweep, RangeSweep, IntervalSweep
    except ImportError:  # pragma: no cover
        return None
    keys = _schema_keys()
    cands = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(cands)
    except Exception as exc:  # Hydra will report syntax errors itself
        return f"cannot parse override: {str(exc).splitlines()[0]}"
    for ov in parsed:
        key = ov.key_or_group
        if key.startswith("hydra") or ov.package or ov.is_delete() or ov.is_add() or ov.is_force_add():
            continue
        value = ov.value()
        values = value.list if isinstance(value, ChoiceSweep) else (
            [] if isinstance(value, (RangeSweep, IntervalSweep)) else [value])
        if key in GROUPS or key == "local":
            group_dir = (os.path.join(os.path.dirname(conf_dir), "sweeps", "sweep") if key == "sweep"
                         else os.path.join(conf_dir, key))
            opts = sorted(p[:-5] for p in os.listdir(group_dir) if p.endswith(".yaml")) if os.path.isdir(group_dir) else []
            for v in values:
                if str(v) not in opts and not (key in ("experiment", "sweep") and v is None):
                    close = difflib.get_close_matches(str(v), opts, n=1)
                    hint = f"did you mean {key}={close[0]}? " if close else ""
                    return f"unknown {key} option '{v}': {hint}choose one of {', '.join(opts)}"
            continue
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            return f"unknown config key '{key}': {hint}(python launch.py --cfg job lists every key)"
        for v in values:
            try:
                _convert(v, keys[key])
            except (ValueError, TypeError) as exc:
                return f"bad value {key}={v!r}: {exc}"
    return None


# ---- run identity: which settings make two runs "the same run" ----------------------------------
NON_SEMANTIC = ("resume", "dry_run", "logger", "log", "name", "hardware.num_threads", "hardware.warmup_steps",
                "hardware.compile", "hardware.compile_scope", "hardware.memory_budget", "data.prefetch", "checkpoint.keep_last",
                "checkpoint.every_steps", "checkpoint.every_minutes", "checkpoint.final")


def semantic_dict(cfg: RunConfig) -> dict:
    """The config minus settings that do not change what is trained (logging, checkpoint cadence,
    threads, compilation...): what resume and idempotent sweeps compare."""
    d = to_dict(cfg)
    for key in NON_SEMANTIC:
        node, *rest = key.split(".")
        if rest:
            d.get(node, {}).pop(rest[0], None)
        else:
            d.pop(node, None)
    return d


def signature(cfg: RunConfig) -> str:
    import hashlib
    import json

    return hashlib.sha1(json.dumps(semantic_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out

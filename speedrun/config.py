"""The typed configuration schema of a run: one dataclass per option, the one place for defaults.

Each Hydra config group fills one dataclass. Groups with alternatives (`model`, `optimizer`,
`objective`) have one dataclass per option — `UNetConfig`, `MuonConfig`, `DiffusionConfig`, ... — each
registered in Hydra's ConfigStore as `<group>/schema_<option>`; a preset under `conf/<group>/` extends
one (`defaults: [schema_unet, _self_]`) and sets only what differs from it. So a key that does not
belong to the chosen option (`objective=mlm objective.eps=0.1`) or a value of the wrong type fails
while Hydra composes, before anything runs, and every default lives here and nowhere else.

The trainer receives plain dataclass objects (never a DictConfig) and never imports Hydra:
`from_container` turns a composed config (or a plain dict: a saved `reproduce.yaml`, a checkpoint's
config) into a validated `RunConfig`, picking each polymorphic group's dataclass by its discriminator
(`model.arch`, `optimizer.name`, `objective.name`).

Static validation lives beside each dataclass (`check()`), cross-field rules in `validate()`; both
raise `ConfigError` with one line that names the fix. Runtime checks that need the device or the data
(memory, attention back-end, FP8, splits) are in `speedrun/preflight.py`.

Keys renamed in 0.2 (`RENAMED`) fail on the command line with a message naming the new key; a saved
flat config of an earlier version is migrated (`migrate_legacy`), so old runs still resume.

This module imports only the standard library and omegaconf: `launch.py --help` and every Hydra
composition stay fast, and the schema pickles cleanly into SLURM jobs and spawned ranks.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List, Optional

from omegaconf import MISSING

from .errors import ConfigError  # noqa: F401  (re-exported: a configuration that cannot run)

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("auto", "fa4", "varlen", "flex", "sdpa")
HEADS = ("mlp", "linear")
RAMPS = ("step", "linear")
SCHEDULES = ("cosine", "wsd", "constant")
RESUME = ("auto", "never", "must")
LOGGERS = ("auto", "none", "wandb")
PROGRESS = ("auto", "bar", "plain")
PACKINGS = ("documents", "stream")
#: what a sweep job returns to its sweeper (an Optuna search minimises it): see speedrun.task.objective_value
SWEEP_OBJECTIVES = ("val_loss", "time_to_target")
SEED_LIMIT = 2**63
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _choice(value: str, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}: set {key} to one of them")


def _positive(value, key: str, minimum=1) -> None:
    if not value >= minimum:  # also rejects NaN
        raise ConfigError(f"{key}={value} must be at least {minimum}")


def _fraction(value: float, key: str, low_open: bool = True, high_open: bool = True) -> None:
    ok = (value > 0.0 if low_open else value >= 0.0) and (value < 1.0 if high_open else value <= 1.0)
    if not ok:  # NaN fails both comparisons
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{key}={value} must be in {lo}0, 1{hi}")


def _learning_rate(value: float, key: str) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(f"{key}={value} must be a finite learning rate >= 0 (0 freezes that group)")


def _seed(value: int, key: str) -> None:
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{key}={value} must be in [0, 2**63): choose a smaller seed")


# ================================================ model ============================================
@dataclass
class ModelConfig:
    """What every architecture has. `arch` picks the option (and the dataclass below)."""
    arch: str = MISSING
    dim: int = 768
    n_layers: int = 24
    n_heads: int = 6
    vocab_size: int = 33
    token_dropout: bool = True  # zero the <mask> embedding (ESM-2 also rescales; see ESM2Config)
    rope_base: float = 10000.0
    attention: str = "auto"  # auto: fa4 -> varlen -> flex on CUDA by what is installed, sdpa elsewhere

    def check(self) -> None:
        _choice(self.attention, ATTENTION, "model.attention")
        _positive(self.n_layers, "model.n_layers")
        _positive(self.n_heads, "model.n_heads")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: change one of them")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head dim {self.dim // self.n_heads} must be even for RoPE: change model.dim or "
                              "model.n_heads")
        if self.vocab_size < 33:
            raise ConfigError(f"model.vocab_size={self.vocab_size} is smaller than the 33-token ESM vocabulary")


@dataclass
class ReferenceFamilyConfig(ModelConfig):
    """The reference's family (RECIPE.md §4): ReLU² MLP, weight-free RMS norms, soft-capped head."""
    mlp_ratio: float = 8 / 3  # hidden = ceil(mlp_ratio * dim / mlp_multiple) * mlp_multiple
    mlp_multiple: int = 256
    tie_embeddings: bool = False  # the head's decoder shares the token-embedding matrix (trained at lr_embed)
    head: str = "mlp"  # mlp: dense->GELU->decoder+bias (current reference); linear: zero-init d x V (Dec-2024)
    soft_cap: float = 32.0  # tanh logit soft-cap c*tanh(z/c); 0 disables

    def check(self) -> None:
        super().check()
        _choice(self.head, HEADS, "model.head")
        if self.tie_embeddings and self.head == "linear":
            raise ConfigError("model.tie_embeddings=true needs model.head=mlp (the linear head is zero-initialised)")


@dataclass
class UNetConfig(ReferenceFamilyConfig):
    """The reference UNet: d=768, 24 layers, 6 heads, MLP 8/3 -> 133,065,357 parameters."""
    arch: str = "unet"
    value_embeddings: bool = True  # one table per encoder layer, reused by its decoder twin

    def check(self) -> None:
        super().check()
        if self.n_layers % 2:
            raise ConfigError(f"model.arch=unet needs an even model.n_layers (got {self.n_layers})")


@dataclass
class TransformerConfig(ReferenceFamilyConfig):
    """The same stack without λ mixing, value embeddings or skips (the reference's --unet False)."""
    arch: str = "transformer"


@dataclass
class PatchUNetConfig(ReferenceFamilyConfig):
    """The Swin-style Patch-UNet over (B, L) rows (RECIPE.md §4.4): 212,279,127 parameters."""
    arch: str = "patch_unet"
    n_layers: int = 12  # UNet levels: half encoder, half decoder
    n_heads: int = 12
    mlp_ratio: float = 2.0
    token_dropout: bool = False
    value_embeddings: bool = True
    n_extra_layers: int = 4  # full-resolution blocks after the UNet

    def check(self) -> None:
        super().check()
        if self.attention in ("fa4", "varlen"):
            raise ConfigError(f"model.attention={self.attention} does not apply to model.arch=patch_unet (per-level "
                              "row masks): use model.attention=auto")


@dataclass
class ESM2Config(ModelConfig):
    """ESM-2 (Lin et al. 2023) exactly: pre-LayerNorm blocks with biases, rotary attention, GELU MLP,
    ESM token dropout (rescaled by 0.88 / (1 - observed mask ratio)), a final LayerNorm, and the LM head
    dense -> GELU -> LayerNorm -> decoder tied to the embeddings + bias. Sizes: conf/model/esm2_*.yaml."""
    arch: str = "esm2"
    dim: int = 320
    n_layers: int = 6
    n_heads: int = 20
    ffn_dim: int = 0  # 0 = 4 * dim, as every published ESM-2
    layer_norm_eps: float = 1e-5

    def check(self) -> None:
        super().check()
        _positive(self.ffn_dim, "model.ffn_dim", 0)


MODELS = {"unet": UNetConfig, "transformer": TransformerConfig, "patch_unet": PatchUNetConfig, "esm2": ESM2Config}


def mlp_hidden(m: ModelConfig) -> int:
    """Hidden width of the MLP: ceil(r*d/multiple)*multiple (the reference's correction_fn), or ESM-2's."""
    if isinstance(m, ESM2Config):
        return m.ffn_dim or 4 * m.dim
    return int(math.ceil(m.mlp_ratio * m.dim / m.mlp_multiple - 1e-9)) * m.mlp_multiple


# ============================================== optimizer ==========================================
@dataclass
class OptimizerConfig:
    """What every optimizer shares: the learning-rate schedule (a multiplier on each group's lr) and clipping."""
    name: str = MISSING
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay, linear decay) | constant
    lr_warmup_steps: int = 1000
    cooldown_frac: float = 0.2  # wsd: fraction of steps in the final linear decay
    min_lr_frac: float = 0.0  # floor of the multiplier at the end of the schedule
    grad_clip: float = 0.0  # clip the global grad norm to this value; 0 = off
    eps: float = 1e-8

    def check(self) -> None:
        _choice(self.schedule, SCHEDULES, "optimizer.schedule")
        _positive(self.lr_warmup_steps, "optimizer.lr_warmup_steps", 0)
        _fraction(self.cooldown_frac, "optimizer.cooldown_frac", False, False)
        _fraction(self.min_lr_frac, "optimizer.min_lr_frac", False, False)
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"optimizer.grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"optimizer.eps={self.eps} must be > 0")

    def learning_rates(self) -> dict:
        return {}


def _betas(betas, key: str) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{key}={list(betas)} must be two numbers in [0, 1)")


@dataclass
class MuonConfig(OptimizerConfig):
    """Muon for the hidden matrices, Adam(0.8, 0.95) for embeddings, head and scalars (RECIPE.md §5)."""
    name: str = "muon"
    lr_hidden: float = 0.05
    momentum: float = 0.95
    momentum_warmup_start: float = 0.85
    momentum_warmup_steps: int = 300
    nesterov: bool = True
    ns_steps: int = 5
    muon_warmup: bool = False  # the reference gives Muon no lr warm-up (Dec-2024 warmed up all four)
    fused_qkv: bool = False  # orthogonalise q, k, v as one 3d x d matrix at lr x sqrt(3) (Dec-2024)
    lr_embed: float = 0.06  # token and value embeddings (and a tied head's decoder)
    lr_head: float = 0.008
    lr_scalar: float = 0.04
    betas: List[float] = field(default_factory=lambda: [0.8, 0.95])

    def check(self) -> None:
        super().check()
        for key, lr in self.learning_rates().items():
            _learning_rate(lr, f"optimizer.{key}")
        _betas(self.betas, "optimizer.betas")
        _fraction(self.momentum, "optimizer.momentum", False)
        _fraction(self.momentum_warmup_start, "optimizer.momentum_warmup_start", False)
        _positive(self.ns_steps, "optimizer.ns_steps")

    def learning_rates(self) -> dict:
        return {"lr_hidden": self.lr_hidden, "lr_embed": self.lr_embed, "lr_head": self.lr_head,
                "lr_scalar": self.lr_scalar}


@dataclass
class AdamWConfig(OptimizerConfig):
    """One AdamW over every parameter (the reference's default without --use_muon)."""
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])

    def check(self) -> None:
        super().check()
        _learning_rate(self.lr, "optimizer.lr")
        _betas(self.betas, "optimizer.betas")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")

    def learning_rates(self) -> dict:
        return {"lr": self.lr}


OPTIMIZERS = {"muon": MuonConfig, "adamw": AdamWConfig}


# ============================================== objective ==========================================
@dataclass
class ObjectiveConfig:
    name: str = MISSING


def _check_rate_schedule(o) -> None:
    _fraction(o.mask_rate, "objective.mask_rate")
    if o.mask_rate_start is not None:
        _fraction(o.mask_rate_start, "objective.mask_rate_start")
    _positive(o.mask_rate_steps, "objective.mask_rate_steps", 0)


def _check_levels(o) -> None:
    _fraction(o.eps, "objective.eps")
    if any(not 0.0 < lv < 1.0 for lv in o.eval_levels):
        raise ConfigError(f"objective.eval_levels={list(o.eval_levels)} must all be in (0, 1)")


@dataclass
class MLMConfig(ObjectiveConfig):
    """Masked LM at one rate (20 %, the current reference), optionally scheduled, <mask>-only or 80/10/10."""
    name: str = "mlm"
    mask_rate: float = 0.2
    mask_rate_start: Optional[float] = None  # with mask_rate_steps: linear schedule start -> mask_rate
    mask_rate_steps: int = 0
    replace: bool = False  # 80/10/10 (<mask>/random/unchanged) instead of <mask>-only

    def check(self) -> None:
        _check_rate_schedule(self)


@dataclass
class DiffusionConfig(ObjectiveConfig):
    """Masked diffusion as DSM defines it: t ~ U(eps, 1) per sequence, CE weighted by 1/t."""
    name: str = "diffusion"
    eps: float = 1e-3
    eval_levels: List[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # extra eval losses

    def check(self) -> None:
        _check_levels(self)


@dataclass
class MLMToDiffusionConfig(DiffusionConfig):
    """MLM at mask_rate for mlm_steps, then a step or linear ramp (ramp_steps) to diffusion."""
    name: str = "mlm_to_diffusion"
    mask_rate: float = 0.2
    mask_rate_start: Optional[float] = None
    mask_rate_steps: int = 0
    mlm_steps: int = 5000
    ramp: str = "linear"  # step (switch at once) | linear (over ramp_steps)
    ramp_steps: int = 5000

    def check(self) -> None:
        _check_levels(self)
        _check_rate_schedule(self)
        _choice(self.ramp, RAMPS, "objective.ramp")
        _positive(self.mlm_steps, "objective.mlm_steps", 0)
        _positive(self.ramp_steps, "objective.ramp_steps", 0)


OBJECTIVES = {"mlm": MLMConfig, "diffusion": DiffusionConfig, "mlm_to_diffusion": MLMToDiffusionConfig}
#: group -> (discriminator key, {option: dataclass}); the group's dataclass is picked by the key's value
POLYMORPHIC = {"model": ("arch", MODELS), "optimizer": ("name", OPTIMIZERS), "objective": ("name", OBJECTIVES)}


# =========================================== the other groups ======================================
@dataclass
class DataConfig:
    name: str = "sample"  # the embedded Swiss-Prot 2014 sample, or a shard-folder dataset
    path: Optional[str] = None  # folder of *_train_*.bin / *_valid_*.bin / *_test_*.bin shards
    max_length: int = 1024  # tokens (specials included): the crop of long training documents, the eval pieces
    crop: bool = True  # crop longer training documents (at a seeded offset); false: keep them whole, the sliding
    # window limiting attention (the reference's way; pieces only past 8 x max_length: speedrun/packing.py)
    packing: str = "documents"  # documents: whole documents back to back | stream: Dec-2024's contiguous T tokens
    seed: int = 0  # data order (per-epoch reshuffle)
    prefetch: int = 2  # batches prepared ahead by the background loader thread
    # where downloaded / prepared datasets live; the dataset configs set path: ${data.root}/<folder>
    root: str = "data"  # conf/data/*.yaml: ${oc.env:SPEEDRUN_DATA,data} (relative to the working directory)
    # published packed shards (data=omgprot50 | uniref50 | og_prot90): python -m speedrun.data download data=...
    repo: Optional[str] = None  # Hugging Face dataset repo, e.g. Synthyra/omg_prot50_packed (null: not on the hub)
    file_prefix: Optional[str] = None  # shard names {file_prefix}_{split}_{index:06d}.bin, e.g. omg_prot50
    num_chunks: int = 0  # train shards (~1e8 tokens each) to download and train on; 0 = every one there is
    revision: Optional[str] = None  # hub branch / tag / commit to download (null = main)

    def check(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length} is too small: use at least 8 tokens")
        _seed(self.seed, "data.seed")
        _positive(self.prefetch, "data.prefetch")
        _positive(self.num_chunks, "data.num_chunks", 0)
        if self.name != "sample" and not self.path:
            raise ConfigError(f"data={self.name} needs a shard folder: pass data.path=DIR")
        _choice(self.packing, PACKINGS, "data.packing")


@dataclass
class HardwareConfig:
    device: str = "auto"  # auto | cpu | cuda
    gpus: int = 1  # ranks per node (spawned by launch.py, or one SLURM task each)
    nodes: int = 1  # SLURM nodes: the launcher asks for this many, the batch arithmetic counts nodes x gpus
    precision: str = "fp32"  # fp32 | bf16 (bf16 activations, fp32 master weights)
    compile: bool = False
    compile_scope: str = "blocks"  # blocks: each block (one graph for all layers, fast compile) | model
    memory_budget: float = 1.0  # torch.compile activation memory budget in (0, 1]: < 1 recomputes cheap ops
    fp8: bool = False  # FP8 GEMMs (dynamic per-tensor scales) for the blocks' matrices; needs precision=bf16
    triton_rope: bool = False  # hand-written Triton QK-norm + RoPE (+ value mix) kernels (unet, transformer; CUDA)
    micro_batch_tokens: int = 8192  # tokens per rank per forward/backward
    grad_accum: Optional[int] = None  # derived from train.batch_tokens when null
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = one per CPU this process may use
    compile_warmup_steps: int = 0  # untimed compile warm-up steps (state restored afterwards)

    def check(self) -> None:
        _choice(self.precision, PRECISIONS, "hardware.precision")
        _choice(self.device, DEVICES, "hardware.device")
        _choice(self.compile_scope, ("blocks", "model"), "hardware.compile_scope")
        _positive(self.gpus, "hardware.gpus")
        _positive(self.nodes, "hardware.nodes")
        _positive(self.micro_batch_tokens, "hardware.micro_batch_tokens", 8)
        _positive(self.num_threads, "hardware.num_threads", 0)
        _positive(self.compile_warmup_steps, "hardware.compile_warmup_steps", 0)
        if self.grad_accum is not None:
            _positive(self.grad_accum, "hardware.grad_accum")
        if not 0.0 < self.memory_budget <= 1.0:
            raise ConfigError(f"hardware.memory_budget={self.memory_budget} must be in (0, 1] (1 = save every "
                              "activation the compiler wants; lower trades recompute for memory)")
        if self.fp8 and self.precision != "bf16":
            raise ConfigError("hardware.fp8=true needs hardware.precision=bf16 (FP8 GEMMs take bf16 activations)")
        if self.fp8 and self.micro_batch_tokens % 16:
            raise ConfigError(f"hardware.fp8=true needs hardware.micro_batch_tokens divisible by 16 "
                              f"(got {self.micro_batch_tokens})")


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

    def check(self) -> None:
        _positive(self.max_steps, "train.max_steps", 0)
        _positive(self.log_every, "train.log_every")
        _positive(self.window_start, "train.window_start")
        if self.window_end is not None:
            _positive(self.window_end, "train.window_end")
        if not self.max_minutes >= 0:
            raise ConfigError(f"train.max_minutes={self.max_minutes} must be >= 0 (0 = no limit)")
        _positive(self.max_bad_steps, "train.max_bad_steps")
        if self.batch_tokens is not None:
            _positive(self.batch_tokens, "train.batch_tokens")


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
    probe_tasks: List[str] = field(default_factory=lambda: ["ss3", "meltome", "solubility"])  # names, NAME@PATH, YAMLs
    probe_layers: str = "all"  # all | last | comma-separated layer ids, e.g. "0,6,12" (0 = input embedding)
    probe_max_sequences: int = 500  # sequences per split (fast subset; 0 = all)
    probe_max_residues: int = 20000  # sampled residues per split for per-residue tasks (0 = all)
    probe_data_dir: Optional[str] = None  # folder of the FLIP zips; null = $SPEEDRUN_PROBE_DATA or the default

    def check(self) -> None:
        _fraction(self.mask_rate, "eval.mask_rate")
        _seed(self.seed, "eval.seed")
        for key in ("every_steps", "max_tokens", "batch_tokens", "probe_every"):
            _positive(getattr(self, key), f"eval.{key}", 0)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = only the final checkpoint
    keep_last: int = 2
    final: bool = True
    every_minutes: float = 0.0  # also save when this much wall time passed since the last checkpoint; 0 = off

    def check(self) -> None:
        _positive(self.every_steps, "checkpoint.every_steps", 0)
        _positive(self.keep_last, "checkpoint.keep_last", 0)
        if not self.every_minutes >= 0:  # also rejects NaN
            raise ConfigError(f"checkpoint.every_minutes={self.every_minutes} must be >= 0 (0 = off)")


@dataclass
class LogConfig:
    progress: str = "auto"  # auto: a progress bar on a terminal, plain lines otherwise | bar | plain
    wandb_project: str = "speedrun-plm"
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None  # default: the sweep name in multirun
    print_config: bool = True  # print the resolved config as a tree at start (rank 0)

    def check(self) -> None:
        _choice(self.progress, PROGRESS, "log.progress")


@dataclass
class RunConfig:
    model: Any = field(default_factory=UNetConfig)  # one of MODELS
    optimizer: Any = field(default_factory=MuonConfig)  # one of OPTIMIZERS
    objective: Any = field(default_factory=MLMConfig)  # one of OBJECTIVES
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
    init_from: Optional[str] = None  # start from these weights: an export, run dir, or (ESM-2) a hub id / HF folder
    # what the job returns to a sweeper (Optuna minimises it): val_loss (final) | time_to_target (train seconds
    # to target_loss; runs that miss it rank after every run that reached it, closest first)
    sweep_objective: str = "val_loss"


@dataclass
class ComposedRunConfig(RunConfig):
    """The schema Hydra composes onto (`schema` in the ConfigStore). The config groups start empty, so
    the chosen preset's dataclass sets their type: `<group>/schema_<option>` for the polymorphic groups,
    `data/schema` and `hardware/schema` for the others. (A flat config of an earlier version, which
    extends no schema node, then composes too, and from_container migrates it.)"""
    model: Any = None
    optimizer: Any = None
    objective: Any = None
    data: Any = None
    hardware: Any = None


GROUP_TYPES = {"data": DataConfig, "hardware": HardwareConfig, "train": TrainConfig, "eval": EvalConfig,
               "checkpoint": CheckpointConfig, "log": LogConfig}


def validate(cfg: RunConfig) -> RunConfig:
    """Each group's own checks, then the rules that span groups. Raises ConfigError."""
    for group in ("model", "optimizer", "objective", *GROUP_TYPES):
        check = getattr(getattr(cfg, group), "check", None)
        if check is not None:
            check()
    _choice(cfg.resume, RESUME, "resume")
    _choice(cfg.logger, LOGGERS, "logger")
    _choice(cfg.sweep_objective, SWEEP_OBJECTIVES, "sweep_objective")
    if cfg.sweep_objective == "time_to_target" and cfg.target_loss is None:
        raise ConfigError("sweep_objective=time_to_target needs target_loss=LOSS (the validation loss to reach)")
    _seed(cfg.seed, "seed")
    if not _NAME_RE.match(cfg.name) or ".." in cfg.name:
        raise ConfigError(f"name={cfg.name!r} must be a plain name (letters, digits, '_', '-', '.'; no '/' or "
                          "'..'): it names the folder under outputs/")
    m, d, h = cfg.model, cfg.data, cfg.hardware
    if h.micro_batch_tokens < d.max_length:
        raise ConfigError(f"hardware.micro_batch_tokens={h.micro_batch_tokens} is smaller than data.max_length="
                          f"{d.max_length}: raise the micro-batch or lower data.max_length")
    if cfg.eval.probe_every > 0 and m.arch not in ("unet", "transformer", "esm2"):  # speedrun.embed's layer-wise states
        raise ConfigError(f"eval.probe_every={cfg.eval.probe_every} needs per-layer embeddings, which "
                          f"model.arch={m.arch} does not provide (unet, transformer and esm2 do): set eval.probe_every=0 "
                          "or change model.arch")
    if d.packing == "stream" and m.arch == "patch_unet":
        raise ConfigError("data.packing=stream does not apply to model.arch=patch_unet (rows of whole documents): "
                          "use data.packing=documents")
    if not d.crop and m.arch == "patch_unet":
        raise ConfigError("data.crop=false does not apply to model.arch=patch_unet (its rows hold data.max_length "
                          "tokens): keep data.crop=true")
    if h.fp8 and m.arch not in ("unet", "transformer"):
        raise ConfigError(f"hardware.fp8=true: model.arch={m.arch} has no FP8 path (unet and transformer have); "
                          "use hardware.fp8=false")
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


# ======================================= building typed configs ====================================
def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for JSON and YAML)."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    return obj


def option_class(group: str, value: Any) -> type:
    """The dataclass of option `value` of a polymorphic group; ConfigError for an unknown one."""
    key, table = POLYMORPHIC[group]
    if value not in table:
        raise ConfigError(f"{group}.{key}={value!r} is not one of {', '.join(table)}: set {group}.{key} (or "
                          f"{group}=...) to one of them")
    return table[value]


def make(group: str, **values) -> Any:
    """A group's dataclass from keyword values, e.g. make('model', arch='transformer', dim=64)."""
    if group not in POLYMORPHIC:
        return GROUP_TYPES[group](**values)
    key, table = POLYMORPHIC[group]
    cls = option_class(group, values.get(key, next(iter(table))))
    return cls(**{k: v for k, v in values.items() if k != key})


# keys renamed in 0.2: old -> new. On the command line they fail naming the new key; in a saved flat
# config of an earlier version (reproduce.yaml, a checkpoint) they are renamed by migrate_legacy.
RENAMED = {"optimizer.warmup_steps": "optimizer.lr_warmup_steps",
           "objective.warmup_steps": "objective.mlm_steps",
           "hardware.warmup_steps": "hardware.compile_warmup_steps"}


def is_legacy(d: dict) -> bool:
    """A flat config of an earlier version: one of the renamed keys is present."""
    return any(isinstance(d.get(old.split(".")[0]), dict) and old.split(".")[1] in d[old.split(".")[0]]
               for old in RENAMED)


def migrate_legacy(d: dict) -> dict:
    """A flat config of version 0.1 in today's shape: renamed keys renamed, and the keys an option's
    dataclass does not have (they had no effect in 0.1, e.g. objective.eps under mlm) dropped."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for old, new in RENAMED.items():
        group, key = old.split(".")
        node = out.get(group)
        if isinstance(node, dict) and key in node:
            node.setdefault(new.split(".")[1], node.pop(key))
    for group, (key, _) in POLYMORPHIC.items():
        node = out.get(group)
        if isinstance(node, dict) and key in node:
            known = {f.name for f in fields(option_class(group, node[key]))}
            out[group] = {k: v for k, v in node.items() if k in known}
    return out


def from_container(container: Any) -> RunConfig:
    """Merge a composed config (DictConfig or dict) onto the schema and return typed dataclasses.

    Unknown keys and wrong types raise ConfigError naming the key; every group's checks and the
    cross-group rules run too."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if OmegaConf.is_config(container):  # resolve everything but Hydra's own node
            container = {k: (OmegaConf.to_container(container[k], resolve=True)
                             if OmegaConf.is_config(container[k]) else container[k])
                         for k in container if k != "hydra"}
        container = {k: v for k, v in dict(container).items() if k != "hydra"}
        if is_legacy(container):
            container = migrate_legacy(container)
        chosen = {}
        for group, (key, table) in POLYMORPHIC.items():
            node = container.get(group)
            value = node.get(key, MISSING) if isinstance(node, dict) else MISSING
            chosen[group] = option_class(group, value)() if value != MISSING else RunConfig().__dict__[group]
        schema = OmegaConf.structured(RunConfig(**chosen))
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, container))
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
    """Register the schema with Hydra's ConfigStore: `schema` (the whole run), `data/schema`,
    `hardware/schema` and, for each polymorphic group, `<group>/schema_<option>` (the option's
    dataclass): the presets in conf/ extend them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=ComposedRunConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="hardware", name="schema", node=HardwareConfig)
    for group, (_, table) in POLYMORPHIC.items():
        for option, cls in table.items():
            cs.store(group=group, name=f"schema_{option}", node=cls)


# ================================== run identity: "the same run" ===================================
NON_SEMANTIC = ("resume", "dry_run", "logger", "log", "name", "sweep_objective", "hardware.num_threads",
                "hardware.triton_rope",
                "hardware.compile_warmup_steps", "hardware.compile", "hardware.compile_scope",
                "hardware.memory_budget", "data.prefetch", "checkpoint.keep_last", "checkpoint.every_steps",
                "checkpoint.every_minutes", "checkpoint.final", "model.attention")


# keys added since 0.1, with their defaults: they count for identity only when set otherwise, so a run of
# an earlier version keeps its identity
ADDED = {"hardware.nodes": 1, "init_from": None, "optimizer.fused_qkv": False, "data.crop": True,
         "data.packing": "documents"}


def semantic_dict(cfg: RunConfig | dict) -> dict:
    """The config minus settings that do not change what is trained (logging, checkpoint cadence,
    threads, compilation, the attention kernel...): what resume and idempotent sweeps compare. A dict
    of an earlier version is migrated first, so an old run keeps its identity."""
    d = to_dict(cfg) if not isinstance(cfg, dict) else (migrate_legacy(cfg) if is_legacy(cfg) else dict(cfg))
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    drop = list(NON_SEMANTIC) + [k for k, default in ADDED.items() if _get(d, k, default) == default]
    for key in drop:
        node, *rest = key.split(".")
        if rest:
            d.get(node, {}).pop(rest[0], None)
        else:
            d.pop(node, None)
    return d


def _get(d: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def signature(cfg: RunConfig | dict) -> str:
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

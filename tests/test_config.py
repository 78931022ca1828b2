"""Every shipped config composes and validates; bad overrides fail early with a message naming the key."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import CONF, ROOT, compose, typed
from speedrun.config import ConfigError, RunConfig, batch_geometry, from_container, validate


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "optimizer", "objective", "data", "hardware", "experiment"])
def test_every_option_composes_and_validates(group):
    opts = _options(group)
    assert opts, f"conf/{group} is empty"
    for opt in opts:
        extra = ["data.path=/tmp/shards"] if opt == "local" or group != "data" else []
        cfg = typed([f"{group}={opt}", *extra])
        assert isinstance(cfg, RunConfig)


def test_default_is_cpu_quickstart():
    cfg = typed()
    assert cfg.hardware.device == "cpu" and cfg.data.name == "sample"
    assert cfg.model.arch == "unet" and cfg.optimizer.name == "muon" and cfg.objective.name == "mlm"
    assert cfg.hardware.micro_batch_tokens == 8192 and cfg.optimizer.warmup_steps == 25
    assert cfg.model.dim == 64 and cfg.train.max_steps == 600


def test_reference_recipe_composes():
    cfg = typed(["model=unet", "optimizer=muon"])
    m, o = cfg.model, cfg.optimizer
    assert (m.arch, m.dim, m.n_layers, m.n_heads) == ("unet", 768, 24, 6)
    assert abs(m.mlp_ratio - 8 / 3) < 1e-12 and not m.tie_embeddings and m.soft_cap == 32.0
    assert (o.lr_hidden, o.lr_embed, o.lr_head, o.lr_scalar) == (0.05, 0.06, 0.008, 0.04)
    assert list(o.betas) == [0.8, 0.95] and o.momentum == 0.95
    assert (o.warmup_steps, o.momentum_warmup_steps, o.momentum_warmup_start) == (1000, 300, 0.85)
    assert o.schedule == "cosine" and not o.muon_warmup
    # the default quick-start experiment sets run length only: a GPU preset keeps its micro-batch
    gpu = typed(["model=unet", "optimizer=muon", "hardware=gpu"])
    assert gpu.hardware.micro_batch_tokens == 65536 and gpu.optimizer.warmup_steps == 1000
    assert cfg.objective.mask_rate == 0.2 and not cfg.objective.replace
    ref = typed(["experiment=reference", "data=local", "data.path=/x"])
    assert ref.train.batch_tokens == 524288 and ref.hardware.precision == "bf16"
    assert batch_geometry(ref, 1)["grad_accum"] == 8
    assert batch_geometry(ref, 4)["grad_accum"] == 2  # the reference README's arithmetic


def test_unknown_key_fails_naming_it():
    with pytest.raises(Exception) as err:
        typed(["train.max_stepz=5"])
    assert "max_stepz" in str(err.value)


def test_wrong_type_fails_naming_it():
    with pytest.raises(Exception) as err:
        typed(["train.max_steps=many"])
    assert "max_steps" in str(err.value)


def test_from_container_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match="unknown config key 'model.dimm'"):
        from_container({"model": {"dimm": 3}})
    with pytest.raises(ConfigError, match="model.dim"):
        from_container({"model": {"dim": "wide"}})
    with pytest.raises(ConfigError, match="model.arch"):
        from_container({"model": {"arch": "lstm"}})
    with pytest.raises(ConfigError, match="n_heads"):
        from_container({"model": {"dim": 100, "n_heads": 3}})
    with pytest.raises(ConfigError, match="data.path"):
        from_container({"data": {"name": "local"}})


def test_batch_geometry_errors_name_the_numbers():
    cfg = validate(RunConfig())
    cfg.train.batch_tokens = 100_000
    cfg.hardware.micro_batch_tokens = 65536
    with pytest.raises(ConfigError, match="train.batch_tokens=100000.*micro_batch_tokens=65536"):
        batch_geometry(cfg, 1)
    cfg.train.batch_tokens = 524288
    cfg.hardware.grad_accum = 3
    with pytest.raises(ConfigError, match="grad_accum=3"):
        batch_geometry(cfg, 1)
    cfg.hardware.grad_accum = None
    assert batch_geometry(cfg, 2) == {"micro_batch_tokens": 65536, "grad_accum": 4, "world_size": 2,
                                      "batch_tokens": 524288}


def _launch(*args, timeout=120):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_help_lists_groups_and_commands():
    r = _launch("--help")
    assert r.returncode == 0
    for word in ("model:", "optimizer:", "objective:", "data:", "hardware:", "unet", "muon", "reproduce", "SLURM"):
        assert word in r.stdout


def test_cli_cfg_job_prints_composed_config():
    r = _launch("--cfg", "job", "model=unet", "optimizer=muon")
    assert r.returncode == 0
    assert "n_layers: 24" in r.stdout and "lr_hidden: 0.05" in r.stdout


def test_cli_typo_fails_before_running():
    r = _launch("train.max_stepz=5")
    assert r.returncode != 0
    assert "max_stepz" in r.stderr


def test_cli_bad_cross_field_value_is_one_line(tmp_path):
    r = _launch("model.dim=100", "model.n_heads=3", f"hydra.run.dir={tmp_path}/r")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "n_heads" in lines[0]

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
    assert cfg.hardware.micro_batch_tokens == 8192 and cfg.optimizer.lr_warmup_steps == 25
    assert cfg.model.dim == 64 and cfg.train.max_steps == 600


def test_reference_recipe_composes():
    cfg = typed(["model=unet", "optimizer=muon"])
    m, o = cfg.model, cfg.optimizer
    assert (m.arch, m.dim, m.n_layers, m.n_heads) == ("unet", 768, 24, 6)
    assert abs(m.mlp_ratio - 8 / 3) < 1e-12 and not m.tie_embeddings and m.soft_cap == 32.0
    assert (o.lr_hidden, o.lr_embed, o.lr_head, o.lr_scalar) == (0.05, 0.06, 0.008, 0.04)
    assert list(o.betas) == [0.8, 0.95] and o.momentum == 0.95
    assert (o.lr_warmup_steps, o.momentum_warmup_steps, o.momentum_warmup_start) == (1000, 300, 0.85)
    assert o.schedule == "cosine" and not o.muon_warmup
    # the default quick-start experiment sets run length only: a GPU preset keeps its micro-batch
    gpu = typed(["model=unet", "optimizer=muon", "hardware=gpu"])
    assert gpu.hardware.micro_batch_tokens == 65536 and gpu.optimizer.lr_warmup_steps == 1000
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


# ---- one dataclass per option, one default per key (issue 17) ------------------------------------
def test_each_option_has_its_own_dataclass_and_keys():
    from speedrun.config import DiffusionConfig, MLMConfig, MLMToDiffusionConfig, MuonConfig, TransformerConfig

    assert isinstance(typed(["objective=mlm"]).objective, MLMConfig)
    diffusion = typed(["objective=diffusion"]).objective
    assert isinstance(diffusion, DiffusionConfig) and not hasattr(diffusion, "mask_rate")  # the unused key is gone
    warm = typed(["objective=mlm_to_diffusion"]).objective
    assert isinstance(warm, MLMToDiffusionConfig) and warm.mlm_steps == 5000 and not hasattr(warm, "replace")
    assert isinstance(typed(["model=transformer"]).model, TransformerConfig)
    assert not hasattr(typed(["model=transformer"]).model, "value_embeddings")
    assert isinstance(typed([]).optimizer, MuonConfig) and not hasattr(typed([]).optimizer, "weight_decay")


def _values(cfg):
    from dataclasses import fields

    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


@pytest.mark.parametrize("group", ["model", "optimizer", "objective", "data", "hardware"])
def test_presets_set_only_what_differs_from_their_dataclass(group):
    """A config key has one default, in one place: a preset that repeats its dataclass's default (or its
    parent preset's value) is a second source of it."""
    from omegaconf import OmegaConf

    for path in sorted((CONF / group).glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        parents = [d for d in raw.pop("defaults", []) if d != "_self_"]
        assert parents, f"{path} extends no schema node (defaults: [schema..., _self_])"
        extra = ["data.path=/x"] if group == "data" else []
        mine = getattr(typed([f"{group}={path.stem}", *extra]), group)
        if parents[0].startswith("schema"):
            reference = _values(type(mine)())
        else:
            reference = _values(getattr(typed([f"{group}={parents[0]}", *extra]), group))
        for key, value in raw.items():
            assert key in reference, f"{path}: {key} is not a key of its schema"
            assert reference[key] != value, f"{path}: {key}: {value} repeats the default"


def test_renamed_keys_fail_naming_the_new_one():
    for old, new in (("optimizer.warmup_steps", "optimizer.lr_warmup_steps"),
                     ("objective.warmup_steps", "objective.mlm_steps"),
                     ("hardware.warmup_steps", "hardware.compile_warmup_steps")):
        r = _launch(f"{old}=3")
        assert r.returncode == 2 and new in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_key_of_another_option_is_one_line_naming_the_option():
    from speedrun.overrides import check_overrides

    msg = check_overrides(["objective=mlm", "objective.eps=0.1"], CONF)
    assert "objective.eps does not apply to objective=mlm" in msg and "diffusion" in msg
    assert "does not apply to objective=diffusion" in check_overrides(["objective=diffusion",
                                                                      "objective.mask_rate=0.3"], CONF)
    assert "model.n_extra_layers does not apply to model=unet" in check_overrides(["model.n_extra_layers=2"], CONF)
    assert check_overrides(["experiment=reference", "optimizer.lr_hidden=0.02"], CONF) is None
    assert "does not apply to optimizer=adamw" in check_overrides(["optimizer=adamw", "optimizer.lr_hidden=1"], CONF)


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr_hidden=nan", "optimizer.lr_hidden"), ("optimizer.lr_embed=-0.1", "optimizer.lr_embed"),
    ("train.log_every=0", "train.log_every"), ("model.n_layers=0", "model.n_layers"),
    ("seed=100000000000000000000", "seed"), ("name=../../x", "name"), ("objective.mask_rate=nan", "mask_rate"),
])
def test_nonsense_values_are_refused_at_config_time(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        typed([override])


LEGACY = ROOT / "tests" / "fixtures" / "legacy_run"


def test_a_reproduce_yaml_of_0_1_still_composes_and_keeps_its_identity():
    """Old names are migrated in a saved flat config: the run resumes under the same identity."""
    import json

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from speedrun.config import MLMToDiffusionConfig, register_schema, signature

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(LEGACY), version_base="1.3"):
        cfg = from_container(hydra_compose(config_name="reproduce"))
    GlobalHydra.instance().clear()
    assert isinstance(cfg.objective, MLMToDiffusionConfig) and cfg.objective.mlm_steps == 7
    assert cfg.optimizer.lr_warmup_steps == 3 and cfg.hardware.compile_warmup_steps == 1
    old = json.loads((LEGACY / "run.json").read_text())
    assert signature(old["config"]) == signature(cfg)

"""Shared fixtures: Hydra composition without running anything, tiny typed configs, CPU threads."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


@pytest.fixture(autouse=True)
def _threads(monkeypatch, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    # keep the tokenized sample out of the user's home, but shared by the whole session
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def compose(overrides: list[str] | None = None, return_hydra: bool = False):
    """Compose conf/config.yaml with overrides through Hydra's compose API (no run)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from speedrun.config import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides or [], return_hydra_config=return_hydra)


def typed(overrides: list[str] | None = None):
    """A validated RunConfig from conf/ plus overrides."""
    from speedrun.config import from_container

    cfg = compose(overrides, return_hydra=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return from_container(cfg)


TINY = [
    "model=unet_tiny", "hardware.micro_batch_tokens=1024", "data.max_length=256", "train.window_start=256",
    "train.log_every=1", "eval.every_steps=0", "eval.max_tokens=6000", "optimizer.lr_warmup_steps=2",
    "optimizer.momentum_warmup_steps=2",
]


@pytest.fixture
def tiny_cfg():
    """Factory: a tiny, fast RunConfig (unet_tiny on the embedded sample)."""
    def make(*extra: str):
        return typed(TINY + list(extra))
    return make


def save_checkpoint(root, step: int, model, cfg, **trainer):
    """A checkpoint as the trainer writes it (speedrun.checkpoint.save), for tests that fake a run."""
    from speedrun import checkpoint as ckpt
    from speedrun.config import to_dict

    return ckpt.save(Path(root), step, model, config={"run": to_dict(cfg), "model": to_dict(cfg.model)},
                     trainer_state={"step": step, **trainer}, tensors={})

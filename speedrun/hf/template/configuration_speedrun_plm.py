"""The configuration of a speedrun-plm export, for transformers' AutoConfig (trust_remote_code).

Written by speedrun-plm (speedrun/hf) into every export folder beside modeling_speedrun_plm.py, so the
folder loads with transformers alone. config.json is also speedrun's own export record: `model` (the
model config: arch, dim, n_layers, ...), `max_length`, `window` and the training provenance, which
become attributes of this config as they are.
"""
from transformers import PretrainedConfig


class SpeedrunPLMConfig(PretrainedConfig):
    """`model`: speedrun's model config (a dict); `max_length`: the training crop (the Patch-UNet's
    row length); `window`: the sliding attention window at the end of training."""

    model_type = "speedrun_plm"

    def __init__(self, model=None, max_length=1024, window=None, **kwargs):
        self.model = dict(model or {})
        self.max_length = int(max_length)
        self.window = int(window) if window is not None else self.max_length
        super().__init__(**kwargs)

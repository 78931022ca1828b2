"""Everything that writes Hugging Face files: exports that transformers loads as they are.

Why: a model people can use is one `AutoModelForMaskedLM.from_pretrained(folder)` away, without
installing speedrun-plm. Two kinds of folder:

* the reference family (`unet`, `transformer`, `patch_unet`): speedrun's export (config.json with
  `format: speedrun-plm`, model.safetensors with speedrun's names, which `speedrun.load` keeps reading)
  plus `auto_map` and a self-contained modeling file (template/, torch + transformers only) for
  `trust_remote_code=True` — `write_remote_code_export`;
* `esm2`: a native EsmForMaskedLM folder (transformers' names, no remote code) — `write_esm2_export`;

both with the EsmTokenizer files of our 33-token vocabulary (`tokenizer_files`). Nothing here imports
transformers: the core never needs it, only the tests and the users of the folders do.
"""
from .tokenizer import tokenizer_files
from .write import REMOTE_CODE_ARCHS, write_esm2_export, write_remote_code_export

__all__ = ["REMOTE_CODE_ARCHS", "tokenizer_files", "write_esm2_export", "write_remote_code_export"]

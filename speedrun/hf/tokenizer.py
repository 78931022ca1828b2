"""The EsmTokenizer files of our vocabulary: `AutoTokenizer.from_pretrained(folder)` gives the ids of
speedrun.vocab.encode (`<cls> residues <eos>`), so transformers users tokenize as we trained.

speedrun/vocab.py has exactly the order of facebook/esm2's vocab.txt; transformers' EsmTokenizer reads
it one token a line and frames a sequence as <cls> ... <eos>.
"""
from __future__ import annotations

import json

from ..vocab import CLS, EOS, MASK, PAD, TOKENS, UNK

SPECIAL_TOKENS = {"cls_token": TOKENS[CLS], "eos_token": TOKENS[EOS], "pad_token": TOKENS[PAD],
                  "unk_token": TOKENS[UNK], "mask_token": TOKENS[MASK]}


def tokenizer_files(max_length: int) -> dict[str, str]:
    """{file name: text} of vocab.txt, tokenizer_config.json and special_tokens_map.json."""
    config = {"tokenizer_class": "EsmTokenizer", "model_max_length": int(max_length), **SPECIAL_TOKENS}
    return {"vocab.txt": "\n".join(TOKENS) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(SPECIAL_TOKENS, indent=2) + "\n"}


__all__ = ["SPECIAL_TOKENS", "tokenizer_files"]

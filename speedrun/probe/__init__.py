"""Representation probes: how good are a model's embeddings, layer by layer (issue 8; RECIPE.md §8, §11).

    python -m speedrun.probe RUN_DIR                                   # ss3, meltome, solubility; every layer
    python -m speedrun.probe RUN_DIR tasks=[ss3,meltome] layers=all
    python -m speedrun.probe RUN_DIR tasks=[ss3@/data/flip_secondary_structure.zip] layers=[0,3,6]
    python -m speedrun.probe RUN_DIR tasks=[mytask.yaml] max_sequences=2000 --data-dir DIR

For each task (speedrun/probe/tasks.py) and each layer (0 = normed input embedding, k = output of
block k), the task's sequences are embedded with `speedrun.embed.embed` (mean-pooled for sequence
tasks, per residue for residue tasks), the features are standardised on the train split, and a
simple probe is fitted on train: multinomial logistic regression (classes) or ridge regression
(values), with the L2 strength chosen on the validation split. The test split is scored with the
chosen probe: accuracy and MCC for classes, Spearman (and Pearson) for values. The best layer is the
one with the best *validation* score, and its test score is the task's result — so choosing the
layer never looks at test.

Baselines go in the same table, fitted the same way on the same sequences and residues:

* `onehot`: context-free features — the residue's one-hot letter (residue tasks), or amino-acid
  composition plus log length (sequence tasks);
* `random_init`: an untrained model of the same shape (seeded). The model's own initialisation
  zero-initialises the attention and MLP output projections, which makes every block an identity,
  so the baseline re-draws those like the other linear layers: a genuinely random contextual network.

Results go to RUN_DIR/probe.json (every layer, split and metric) and RUN_DIR/probe.png (test score
per layer, one panel per task); the flat metrics (`probe/ss3/test_acc`, ...) are merged into
RUN_DIR/summary.json, so sweep reports see them. During training, `run_probes(model, ...)` returns
the same flat metrics on a fast subset (`eval.probe_every`, `eval.probe_*`).

Options (`key=value`): tasks, layers (all | last | int | list), baselines ([onehot,random_init] | []),
max_sequences (per split; 0 = all), max_residues (sampled residues per split for residue tasks; 0 =
all), seed, device (auto | cpu | cuda), dtype (fp32 | bf16), batch_tokens, max_length (default: the
run's data.max_length, at most 1024), data_dir (the FLIP zips; also --data-dir or
$SPEEDRUN_PROBE_DATA), out (folder for probe.json/probe.png; default RUN_DIR), update_summary, plot.
"""
from __future__ import annotations

# One job per module, each importing only those before it: tasks <- features <- fitting <- report <- __main__
#   tasks     what a task is and where its data comes from (FLIP, aaanalysis, tables), homology folds
#   features  the layers, the probed subset of each task, a model's per-layer features for it
#   fitting   metrics, the linear probes, the baselines, one model probed on every task
#   report    flat metrics (and `run_probes` for the trainer), the table, probe.png, probe.json, summary.json
#   __main__  the command line: a run directory in, probe.json / probe.png / summary.json out
from .features import Prepared, check_eval_config, get_prepared, model_features, parse_layers, prepare
from .fitting import (BASELINES, classification_metrics, fit_layers, fit_logistic, fit_ridge, onehot_features,
                      pearson, probe_model, probe_task, random_init_like, regression_metrics, spearman)
from .report import flat_metrics, format_table, plot, run_probes, run_probes_from_config
from .tasks import DEFAULT_TASKS, SPLITS, ProbeDataError, ProbeError, ProbeTask, load_task, task_name


def __getattr__(name: str):
    # the CLI's `main` on demand: importing __main__ here would make `python -m speedrun.probe` warn
    # (runpy finds the module already imported) on the stderr that the CLI keeps to one line
    if name == "main":
        from .__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BASELINES", "DEFAULT_TASKS", "SPLITS", "Prepared", "ProbeDataError", "ProbeError", "ProbeTask",
           "check_eval_config", "classification_metrics", "fit_layers", "fit_logistic", "fit_ridge", "flat_metrics",
           "format_table", "get_prepared", "load_task", "main", "model_features", "onehot_features", "parse_layers",
           "pearson", "plot", "prepare", "probe_model", "probe_task", "random_init_like", "regression_metrics",
           "run_probes", "run_probes_from_config", "spearman", "task_name"]

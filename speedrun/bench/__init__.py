"""Benchmarks run by hand, not timed tests: `python -m speedrun.bench` (training), `python -m speedrun.bench.loader`
(the data loader alone)."""

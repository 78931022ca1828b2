#!/usr/bin/env python3
"""Rebuild the embedded default data: a deterministic sample of UniProtKB/Swiss-Prot release 2014_01.

    python scripts/swissprot2014_fasta.py sp2014.fasta   # downloads Debian metastudent-data (225 MB)
    python scripts/build_sample.py sp2014.fasta speedrun/assets/swissprot2014_sample.fasta.gz

Selection: the distinct sequences (first accession wins) whose salted BLAKE2b hash falls under a
threshold chosen to give about `--residues` residues — a uniform, order-free and reproducible sample.
The train/valid/test split is *not* decided here: it is a hash of each sequence, computed when the
sample is tokenized (speedrun.data.split_of), the same rule `python -m speedrun.data prepare` uses.

Data licence: CC BY 4.0, "UniProtKB/Swiss-Prot release 2014_01, The UniProt Consortium".
"""
from __future__ import annotations

import argparse
import gzip
import hashlib


def read_fasta(path):
    name, parts = None, []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if name is not None:
                    yield name, "".join(parts)
                name, parts = line[1:].split()[0], []
            elif line:
                parts.append(line)
    if name is not None:
        yield name, "".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fasta")
    ap.add_argument("out")
    ap.add_argument("--residues", type=float, default=7.0e6, help="target residue count")
    ap.add_argument("--salt", default="speedrun-plm-sample-v1")
    a = ap.parse_args()

    seen, records, total = set(), [], 0
    for acc, seq in read_fasta(a.fasta):
        if seq in seen:
            continue
        seen.add(seq)
        records.append((acc, seq))
        total += len(seq)
    frac = min(1.0, a.residues / total)
    threshold = int(frac * 2**64)
    chosen = []
    for acc, seq in records:
        h = int.from_bytes(hashlib.blake2b((a.salt + seq).encode(), digest_size=8).digest(), "little")
        if h < threshold:
            chosen.append((acc, seq))
    with gzip.GzipFile(a.out, "wb", compresslevel=9, mtime=0) as f:
        for acc, seq in chosen:
            f.write(f">{acc}\n".encode())
            for i in range(0, len(seq), 80):
                f.write((seq[i:i + 80] + "\n").encode())
    n_res = sum(len(s) for _, s in chosen)
    print(f"{len(records)} distinct sequences, {total} residues; sampled {len(chosen)} sequences, "
          f"{n_res} residues -> {a.out}")


if __name__ == "__main__":
    main()

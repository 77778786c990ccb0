"""Rebuild the quantum domain's property table, `loramix/science/data/quantum_properties.csv`.

Enumerates the molecules (`loramix.science.quantum.enumerate_molecules`) and runs a GFN2-xTB
single point on each (tblite, at the RDKit/MMFF94 geometry): about 0.1 s per molecule, a few
minutes in all. The output is deterministic for fixed RDKit and tblite versions; the data
generators only read the table. Usage: python scripts/quantum_table.py [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import time

from loramix.atomic import write_text_atomic
from loramix.science import quantum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default=str(quantum.TABLE), help="CSV file to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    smiles = quantum.enumerate_molecules()
    rows = list(quantum.compute_table(smiles))
    write_text_atomic(args.out, quantum.table_text(rows))
    logging.info(
        "%d of %d molecules computed in %.0f s -> %s",
        len(rows),
        len(smiles),
        time.perf_counter() - start,
        args.out,
    )


if __name__ == "__main__":
    main()

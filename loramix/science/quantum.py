"""Molecular properties from quantum mechanics: GFN2-xTB gaps and dipoles, and molecule design.

    homo_lumo_gap   "What is the GFN2-xTB HOMO-LUMO gap in eV of the molecule C C O?"  -> "11.8"
    dipole          "What is the GFN2-xTB dipole moment in debye of the molecule C C O?" -> "1.6"
    design_molecule "Which molecule, as SMILES, has the heavy atoms C3 O and a hydroxyl group?"
                                                                              -> "C C C O"
                    (any molecule RDKit parses with exactly those heavy atoms and that group
                    is right)

The molecules are small closed-shell organics (2-9 heavy atoms of C, N, O, F, Cl, S) made by
joining substituents (`enumerate_molecules`). Their properties come from tblite's GFN2-xTB
(a semi-empirical tight-binding method) at a geometry that RDKit embeds (ETKDG, random seed
0) and relaxes with the MMFF94 force field, the gap from the orbital energies, the dipole's
norm converted with pint. A calculation takes about 0.1 s, too slow for the thousands of draws
of a data run, so the values are computed once by `scripts/quantum_table.py` into the shipped
table `data/quantum_properties.csv`, which the generators read; a test recomputes a sample of
rows. Answers have one decimal and are right within 0.1 (eV or debye).
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from loramix.science.formats import (
    format_fixed,
    format_formula,
    format_smiles,
    parse_number,
    parse_smiles,
)
from loramix.science.task import Task, close, require

DOMAIN = "quantum"
TABLE = Path(__file__).resolve().parent / "data" / "quantum_properties.csv"
TABLE_COLUMNS = ("smiles", "gap_ev", "dipole_debye")
ELEMENTS = ("C", "N", "O", "F", "Cl", "S")
MAX_HEAVY_ATOMS = 9
DECIMALS = 1
ABS_TOL = 0.1  # eV or debye: right to the printed decimal, up to rounding
EMBED_SEED = 0

# Substituents joined as LEFT + CORE + RIGHT by plain SMILES concatenation (the last atom of
# one part bonds to the first atom of the next); RDKit drops the invalid joins.
LEFT = (
    "C", "CC", "CC(C)", "C=C", "C#C", "c1ccccc1", "O", "N", "F", "Cl", "S", "OC", "NC", "CN(C)",
    "O=C", "N#C", "CC(=O)", "OC(=O)", "NC(=O)", "FC(F)(F)", "ClC", "C1CC1",
)  # fmt: skip
CORE = ("", "C", "CC", "C(=O)", "C=C", "c1ccc(cc1)", "C(O)", "N", "O", "C(C)")
RIGHT = ("", "C", "CC", "O", "N", "F", "Cl", "C=O", "C#N", "C(=O)O", "C(N)=O", "OC", "S")

# Functional groups of the design task: name -> SMARTS (RDKit substructure patterns).
GROUPS = {
    "hydroxyl": "[CX4,c][OX2H]",
    "carbonyl": "[CX3]=[OX1]",
    "carboxylic acid": "C(=O)[OX2H]",
    "amine": "[NX3;!$(N-C=O)]",
    "amide": "C(=O)[NX3]",
    "nitrile": "C#N",
    "alkene": "C=C",
    "ether": "[OD2]([#6])[#6]",
    "benzene ring": "c1ccccc1",
    "thiol": "[SX2H]",
}


@dataclass(frozen=True)
class Molecule:
    """One row of the property table.

    Attributes:
        smiles: RDKit's canonical SMILES.
        gap_ev: GFN2-xTB HOMO-LUMO gap in eV.
        dipole_debye: Norm of the GFN2-xTB dipole moment in debye.
    """

    smiles: str
    gap_ev: float
    dipole_debye: float


def enumerate_molecules() -> list[str]:
    """The canonical SMILES of every valid join of `LEFT`, `CORE` and `RIGHT`, sorted.

    Kept: neutral, closed-shell molecules of 2 to `MAX_HEAVY_ATOMS` heavy atoms of `ELEMENTS`.
    """
    chem = require("rdkit.Chem")
    require("rdkit.RDLogger").DisableLog("rdApp.*")  # invalid joins are expected
    found = set()
    for left in LEFT:
        for core in CORE:
            for right in RIGHT:
                mol = chem.MolFromSmiles(left + core + right)
                if mol is None or not _acceptable(mol):
                    continue
                found.add(chem.MolToSmiles(mol))
    return sorted(found)


def _acceptable(mol: Any) -> bool:
    atoms = list(mol.GetAtoms())
    if not 2 <= len(atoms) <= MAX_HEAVY_ATOMS:
        return False
    electrons = sum(a.GetAtomicNum() + a.GetTotalNumHs() for a in atoms)
    return electrons % 2 == 0 and all(
        a.GetSymbol() in ELEMENTS and a.GetFormalCharge() == 0 and a.GetNumRadicalElectrons() == 0
        for a in atoms
    )


def compute_properties(smiles: str) -> Molecule:
    """GFN2-xTB gap and dipole of `smiles` at its RDKit/MMFF94 geometry (deterministic).

    Raises:
        ValueError: If RDKit cannot read or embed the molecule.
    """
    chem = require("rdkit.Chem")
    all_chem = require("rdkit.Chem.AllChem")
    numpy = require("numpy")
    interface = require("tblite.interface")
    units = _units()
    mol = chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot read the SMILES {smiles!r}")
    mol = chem.AddHs(mol)
    if all_chem.EmbedMolecule(mol, randomSeed=EMBED_SEED) != 0:
        raise ValueError(f"RDKit cannot embed {smiles!r} in 3D")
    all_chem.MMFFOptimizeMolecule(mol)
    bohr = float(units.Quantity(1, "bohr").to("angstrom").magnitude)
    positions = mol.GetConformer().GetPositions() / bohr  # (N, 3) in bohr
    numbers = numpy.array([atom.GetAtomicNum() for atom in mol.GetAtoms()])  # (N,)
    calculator = interface.Calculator("GFN2-xTB", numbers, positions)
    calculator.set("verbosity", 0)
    result = calculator.singlepoint()
    energies = result.get("orbital-energies")  # (orbitals,) in hartree
    occupied = numpy.nonzero(result.get("orbital-occupations") > 1.0)[0]
    homo = int(occupied[-1])
    gap = units.Quantity(float(energies[homo + 1] - energies[homo]), "hartree").to("eV")
    dipole = units.Quantity(float(numpy.linalg.norm(result.get("dipole"))), "e * bohr")
    return Molecule(
        chem.MolToSmiles(chem.RemoveHs(mol)),
        round(float(gap.magnitude), 4),
        round(float(dipole.to("debye").magnitude), 4),
    )


def table_text(molecules: list[Molecule]) -> str:
    """The CSV text of the property table (header `TABLE_COLUMNS`, rows in the given order)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for m in molecules:
        writer.writerow((m.smiles, f"{m.gap_ev:.4f}", f"{m.dipole_debye:.4f}"))
    return out.getvalue()


def compute_table(smiles: list[str]) -> Iterator[Molecule]:
    """`compute_properties` of each molecule, skipping those RDKit cannot embed."""
    for item in smiles:
        try:
            yield compute_properties(item)
        except ValueError:
            continue


@cache
def molecules() -> tuple[Molecule, ...]:
    """The shipped property table.

    Raises:
        FileNotFoundError: If the table is missing; the message says how to rebuild it.
        ValueError: If its header is not `TABLE_COLUMNS`.
    """
    if not TABLE.is_file():
        raise FileNotFoundError(
            f"{TABLE} is missing; rebuild it with `python scripts/quantum_table.py` "
            "(needs tblite and rdkit: pip install 'loramix[science]')"
        )
    with TABLE.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(rows[0]) != TABLE_COLUMNS:
        raise ValueError(
            f"{TABLE}: the header must be {','.join(TABLE_COLUMNS)}; rebuild the table with "
            "`python scripts/quantum_table.py`"
        )
    return tuple(Molecule(s, float(g), float(d)) for s, g, d in rows[1:])


@cache
def _units() -> Any:
    from loramix.science.mechanics import units

    return units()


def heavy_atoms(smiles: str) -> dict[str, int]:
    """RDKit's heavy-atom counts in Hill order: "CCO" -> {"C": 2, "O": 1}.

    Raises:
        ValueError: If RDKit cannot read the SMILES.
    """
    mol = read_smiles(smiles)
    counts: dict[str, int] = {}
    for atom in mol.GetAtoms():
        counts[atom.GetSymbol()] = counts.get(atom.GetSymbol(), 0) + 1
    rest = sorted(el for el in counts if el != "C")
    return {el: counts[el] for el in ("C", *rest) if el in counts}


def has_group(smiles: str, group: str) -> bool:
    """Whether RDKit finds the functional group `group` (a key of `GROUPS`) in the molecule."""
    pattern = require("rdkit.Chem").MolFromSmarts(GROUPS[group])
    return bool(read_smiles(smiles).HasSubstructMatch(pattern))


def read_smiles(smiles: str) -> Any:
    """RDKit's molecule (without explicit hydrogens) for a SMILES string.

    Raises:
        ValueError: If RDKit cannot read it.
    """
    chem = require("rdkit.Chem")
    require("rdkit.RDLogger").DisableLog("rdApp.*")  # generated garbage is expected
    mol = chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        raise ValueError(f"RDKit cannot read the SMILES {smiles!r}")
    return mol


def _gen_gap(rng: random.Random) -> tuple[str, str, float]:
    m = rng.choice(molecules())
    prompt = f"What is the GFN2-xTB HOMO-LUMO gap in eV of the molecule {format_smiles(m.smiles)}?"
    return prompt, format_fixed(m.gap_ev, DECIMALS), m.gap_ev


def _gen_dipole(rng: random.Random) -> tuple[str, str, float]:
    m = rng.choice(molecules())
    prompt = (
        f"What is the GFN2-xTB dipole moment in debye of the molecule {format_smiles(m.smiles)}?"
    )
    return prompt, format_fixed(m.dipole_debye, DECIMALS), m.dipole_debye


def _check_value(answer: float, generated: str) -> bool:
    return close(parse_number(generated), answer, abs_tol=ABS_TOL)


@cache
def _groups_of() -> dict[str, tuple[str, ...]]:
    """SMILES of the table -> the functional groups RDKit finds in it."""
    return {m.smiles: tuple(g for g in GROUPS if has_group(m.smiles, g)) for m in molecules()}


def _gen_design(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    while True:
        m = rng.choice(molecules())
        groups = _groups_of()[m.smiles]
        if groups:
            break
    group = rng.choice(groups)
    counts = heavy_atoms(m.smiles)
    prompt = (
        f"Which molecule, as SMILES, has the heavy atoms {format_formula(counts)} and "
        f"{'an' if group[0] in 'aeiou' else 'a'} {group} group?"
    )
    answer = {"atoms": counts, "group": group, "example": m.smiles}
    return prompt, format_smiles(m.smiles), answer


def _check_design(answer: dict[str, Any], generated: str) -> bool:
    smiles = parse_smiles(generated)
    return heavy_atoms(smiles) == answer["atoms"] and has_group(smiles, answer["group"])


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "homo_lumo_gap", _gen_gap, _check_value),
    Task(DOMAIN, "dipole", _gen_dipole, _check_value),
    Task(DOMAIN, "design_molecule", _gen_design, _check_design),
)

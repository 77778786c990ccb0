"""Biology: DNA codons -> peptide translation, reverse complement, and DNA design (Biopython).

    translate            "What peptide do the DNA codons ATG GCC TTT encode?"  -> "M-A-F"
    reverse_complement   "What is the reverse complement of the DNA codons ATG GCC TTT?"
                                                                               -> "AAA GGC CAT"
    design_dna           "Which 3 DNA codons encode the peptide M-A-F?"        -> "ATG GCT TTC"
                         (any DNA that Biopython translates to M-A-F is right)

Translation uses Biopython's standard codon table (NCBI table 1); inputs are 3-5 codons.
"""

from __future__ import annotations

import random
from functools import cache

from loramix.science.formats import format_codons, format_peptide, parse_dna, parse_peptide
from loramix.science.task import Task, require

DOMAIN = "biology"
MIN_CODONS, MAX_CODONS = 3, 5
BASES = "TCAG"


@cache
def sense_codons() -> tuple[str, ...]:
    """The 61 codons that code for an amino acid in the standard table, sorted."""
    table = require("Bio.Data.CodonTable").standard_dna_table
    return tuple(sorted(table.forward_table))


@cache
def synonymous_codons() -> dict[str, tuple[str, ...]]:
    """Amino acid (one letter) -> the codons that encode it, sorted."""
    table = require("Bio.Data.CodonTable").standard_dna_table
    out: dict[str, list[str]] = {}
    for codon, residue in sorted(table.forward_table.items()):
        out.setdefault(residue, []).append(codon)
    return {residue: tuple(codons) for residue, codons in sorted(out.items())}


def translate(dna: str) -> str:
    """Biopython's translation of whole codons, stops written "*": "ATGGCCTTT" -> "MAF"."""
    if len(dna) % 3:
        raise ValueError(f"DNA of length {len(dna)} is not a whole number of codons")
    return str(require("Bio.Seq").Seq(dna).translate())


def reverse_complement(dna: str) -> str:
    """Biopython's reverse complement: "ATGGCC" -> "GGCCAT"."""
    return str(require("Bio.Seq").Seq(dna).reverse_complement())


def random_coding_dna(rng: random.Random) -> str:
    """3-5 random sense codons (no stop codon)."""
    n = rng.randint(MIN_CODONS, MAX_CODONS)
    return "".join(rng.choice(sense_codons()) for _ in range(n))


def _gen_translate(rng: random.Random) -> tuple[str, str, str]:
    dna = random_coding_dna(rng)
    peptide = translate(dna)
    prompt = f"What peptide do the DNA codons {format_codons(dna)} encode?"
    return prompt, format_peptide(peptide), peptide


def _check_translate(answer: str, generated: str) -> bool:
    return parse_peptide(generated) == answer


def _gen_reverse_complement(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(MIN_CODONS, MAX_CODONS)
    dna = "".join(rng.choice(BASES) for _ in range(3 * n))
    answer = reverse_complement(dna)
    prompt = f"What is the reverse complement of the DNA codons {format_codons(dna)}?"
    return prompt, format_codons(answer), answer


def _check_reverse_complement(answer: str, generated: str) -> bool:
    return parse_dna(generated) == answer


def _gen_design_dna(rng: random.Random) -> tuple[str, str, dict[str, str]]:
    residues = sorted(synonymous_codons())
    n = rng.randint(MIN_CODONS, MAX_CODONS)
    peptide = "".join(rng.choice(residues) for _ in range(n))
    dna = "".join(rng.choice(synonymous_codons()[r]) for r in peptide)
    if translate(dna) != peptide:  # cannot happen with a consistent codon table
        raise RuntimeError(f"Biopython translates {dna} to {translate(dna)}, not {peptide}")
    prompt = f"Which {n} DNA codons encode the peptide {format_peptide(peptide)}?"
    return prompt, format_codons(dna), {"peptide": peptide, "example": dna}


def _check_design_dna(answer: dict[str, str], generated: str) -> bool:
    dna = parse_dna(generated)
    return len(dna) % 3 == 0 and translate(dna) == answer["peptide"]


TASKS: tuple[Task, ...] = (
    Task(DOMAIN, "translate", _gen_translate, _check_translate),
    Task(DOMAIN, "reverse_complement", _gen_reverse_complement, _check_reverse_complement),
    Task(DOMAIN, "design_dna", _gen_design_dna, _check_design_dna),
)

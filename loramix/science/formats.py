"""Text formats whose units line up with SmolLM2 tokens, and the parsers that read them back.

A rank-8 LoRA on SmolLM2-135M learns a mapping only when each unit of the input and of the
answer is one token or one stable group of tokens. Measured on the SmolLM2 tokenizer (GPT-2
style byte-level BPE that splits every digit into its own token):

    codons     "ATG GCC TTT"   -> " AT|G", " G|CC", " T|TT": one word per codon, 1-2 tokens
                                  each, the same tokens wherever the codon stands (unspaced
                                  "ATGGCCTTT" merges across codons: "AT|GG|CC|TT|T")
    peptides   "M-A-F"         -> "M", "-", "A", "-", "F": one token per residue, for all 20
    formulas   "C2 H6 O"       -> " C", "2", " H", "6", " O": one token per element symbol
                                  (unspaced "CH4O" merges "CH")
    numbers    "46.1", "+2"    -> one token per digit, so answers use fixed decimals
    SMILES     "C C ( = O ) O" -> "C", " C", " (", " =", " O", " )", " O": one token per atom,
                                  bond or branch (unspaced "CC(=O)O" merges "CC")
    names      "Ann Ben Cal"   -> "Ann", " Ben", " Cal": one token per name
    algebra    "3*x^2 + 2*x"   -> "3", "*", "x", "^", "2", " +", " ", "2", "*", "x": one token
                                  per symbol, digit and operator

The parsers read the first line of generated text (up to a newline or an end-of-turn marker)
and ignore whatever follows the answer on that line.
"""

from __future__ import annotations

import re

STOP_MARKERS = ("\n", "<|im_end|>", "<|endoftext|>")

_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_PEPTIDE = re.compile(r"[A-Z](?:-[A-Z])+\b|[A-Z]+\b")
_DNA = re.compile(r"[ACGT]+(?: [ACGT]+)*")
_FORMULA = re.compile(r"(?:[A-Z][a-z]?\d*)(?: ?[A-Z][a-z]?\d*)*")
_FORMULA_PART = re.compile(r"([A-Z][a-z]?)(\d*)")
_SMILES_UNIT = re.compile(r"\[[^\]]+]|Br|Cl|%\d\d|[BCNOSPFIbcnops()=#\-+\\/:@.*\d]")
_SMILES_WORD = re.compile(rf"(?:{_SMILES_UNIT.pattern})+")
_NAMES = re.compile(r"[A-Z][a-z]+(?:,? [A-Z][a-z]+)*")


def format_codons(dna: str) -> str:
    """ "ATGGCCTTT" -> "ATG GCC TTT" (the length must be a multiple of 3)."""
    if len(dna) % 3:
        raise ValueError(f"DNA of length {len(dna)} is not a whole number of codons: {dna!r}")
    return " ".join(dna[i : i + 3] for i in range(0, len(dna), 3))


def format_peptide(sequence: str) -> str:
    """ "MAF" -> "M-A-F"."""
    return "-".join(sequence)


def format_formula(counts: dict[str, int]) -> str:
    """{"C": 2, "H": 6, "O": 1} -> "C2 H6 O", in the order given (use Hill order)."""
    return " ".join(f"{el}{n if n != 1 else ''}" for el, n in counts.items() if n > 0)


def format_fixed(value: float, decimals: int) -> str:
    """A number with a fixed count of decimals, never "-0.0"."""
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def format_signed(value: int) -> str:
    """2 -> "+2", -1 -> "-1", 0 -> "0"."""
    return f"{value:+d}" if value else "0"


def format_plain(value: float) -> str:
    """A number without exponent or trailing zeros: 2500.0 -> "2500", 0.35 -> "0.35"."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def format_significant(value: float, digits: int = 3) -> str:
    """A number rounded to `digits` significant digits, without exponent: 81.84 -> "81.8",
    0.04567 -> "0.0457", 1234.5 -> "1230"."""
    return format_plain(float(f"{value:.{digits}g}"))


def format_smiles(smiles: str) -> str:
    """ "CC(=O)O" -> "C C ( = O ) O": one unit (atom, bond, branch, ring digit) per word.

    Raises:
        ValueError: If the SMILES holds characters that are not SMILES units.
    """
    units = _SMILES_UNIT.findall(smiles)
    if "".join(units) != smiles:
        raise ValueError(f"not a SMILES string made of known units: {smiles!r}")
    return " ".join(units)


def format_names(names: list[str] | tuple[str, ...]) -> str:
    """["Ann", "Ben", "Cal"] -> "Ann Ben Cal"."""
    return " ".join(names)


def answer_text(generated: str) -> str:
    """The first line of generated text, stripped, without a trailing period."""
    for marker in STOP_MARKERS:
        generated = generated.split(marker, 1)[0]
    return generated.strip().removesuffix(".").strip()


def parse_number(generated: str) -> float:
    """The first number in the answer line ("+2", "46.07 g/mol", "K-D-R 389").

    Raises:
        ValueError: If the answer line holds no number.
    """
    match = _NUMBER.search(answer_text(generated))
    if match is None:
        raise ValueError(f"no number in {generated!r}")
    return float(match.group())


def parse_int(generated: str) -> int:
    """The first number of the answer line, which must be a whole number.

    Raises:
        ValueError: If there is no number, or it is not whole.
    """
    value = parse_number(generated)
    if value != int(value):
        raise ValueError(f"{value} is not a whole number")
    return int(value)


def parse_peptide(generated: str) -> str:
    """ "M-A-F ..." -> "MAF"; also reads the unseparated "MAF".

    Raises:
        ValueError: If the answer line does not start with a peptide.
    """
    match = _PEPTIDE.match(answer_text(generated))
    if match is None:
        raise ValueError(f"no peptide at the start of {generated!r}")
    return match.group().replace("-", "")


def parse_dna(generated: str) -> str:
    """ "ATG GCC TTT ..." -> "ATGGCCTTT" (spacing is not checked here).

    Raises:
        ValueError: If the answer line does not start with DNA bases.
    """
    match = _DNA.match(answer_text(generated))
    if match is None:
        raise ValueError(f"no DNA at the start of {generated!r}")
    return match.group().replace(" ", "")


def parse_formula(generated: str) -> dict[str, int]:
    """ "C2 H6 O ..." (or "C2H6O") -> {"C": 2, "H": 6, "O": 1}; a repeated symbol adds up.

    Raises:
        ValueError: If the answer line does not start with a formula.
    """
    match = _FORMULA.match(answer_text(generated))
    if match is None:
        raise ValueError(f"no formula at the start of {generated!r}")
    counts: dict[str, int] = {}
    for symbol, digits in _FORMULA_PART.findall(match.group()):
        counts[symbol] = counts.get(symbol, 0) + (int(digits) if digits else 1)
    return counts


def parse_smiles(generated: str) -> str:
    """ "C C ( = O ) O is ..." (or "CC(=O)O") -> "CC(=O)O": the leading words made of SMILES units.

    RDKit, not this parser, judges whether the result is a molecule.

    Raises:
        ValueError: If the answer line does not start with SMILES units.
    """
    words = []
    for word in answer_text(generated).split(" "):
        if not _SMILES_WORD.fullmatch(word):
            break
        words.append(word)
    if not words:
        raise ValueError(f"no SMILES at the start of {generated!r}")
    return "".join(words)


def parse_names(generated: str) -> list[str]:
    """ "Ann Ben Cal ..." (or "Ann, Ben, Cal") -> ["Ann", "Ben", "Cal"]: capitalised words.

    Raises:
        ValueError: If the answer line does not start with a capitalised name.
    """
    match = _NAMES.match(answer_text(generated))
    if match is None:
        raise ValueError(f"no names at the start of {generated!r}")
    return match.group().replace(",", "").split()

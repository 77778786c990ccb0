"""Text formats and parsers of loramix.science (no science extra needed)."""

from __future__ import annotations

import pytest

from loramix.science import formats


def test_formats_write_token_aligned_units():
    assert formats.format_codons("ATGGCCTTT") == "ATG GCC TTT"
    assert formats.format_peptide("MAF") == "M-A-F"
    assert formats.format_formula({"C": 2, "H": 6, "O": 1}) == "C2 H6 O"
    assert formats.format_fixed(46.068, 1) == "46.1"
    assert formats.format_fixed(-0.04, 1) == "0.0"
    assert [formats.format_signed(n) for n in (2, -1, 0)] == ["+2", "-1", "0"]
    assert formats.format_plain(2500.0) == "2500"
    assert formats.format_plain(0.35) == "0.35"


def test_format_codons_refuses_partial_codons():
    with pytest.raises(ValueError, match="not a whole number of codons"):
        formats.format_codons("ATGG")


def test_answer_text_reads_only_the_first_line():
    assert formats.answer_text(" M-A-F.\nThe peptide is long") == "M-A-F"
    assert formats.answer_text("+2<|im_end|>junk") == "+2"


def test_parsers_read_the_answer_and_ignore_trailing_text():
    assert formats.parse_number("46.07 g/mol") == 46.07
    assert formats.parse_number("K-D-R -1") == -1
    assert formats.parse_int("+2") == 2
    assert formats.parse_peptide("M-A-F is the answer") == "MAF"
    assert formats.parse_peptide("MAF") == "MAF"
    assert formats.parse_dna("ATG GCC TTT, done") == "ATGGCCTTT"
    assert formats.parse_formula("C2 H6 O is ethanol") == {"C": 2, "H": 6, "O": 1}
    assert formats.parse_formula("CH3CH2OH") == {"C": 2, "H": 6, "O": 1}


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (formats.parse_number, "no idea"),
        (formats.parse_int, "2.5"),
        (formats.parse_peptide, "the peptide"),
        (formats.parse_dna, "xyz"),
        (formats.parse_formula, "ethanol"),
        (formats.parse_number, "\n42"),  # the answer line is empty
    ],
)
def test_parsers_reject_text_without_an_answer(parser, text):
    with pytest.raises(ValueError):
        parser(text)


def test_new_formats_write_one_unit_per_word_and_parse_back():
    assert formats.format_smiles("CC(=O)O") == "C C ( = O ) O"
    assert formats.format_smiles("ClCC#N") == "Cl C C # N"  # two-letter atoms stay whole
    assert formats.format_smiles("c1ccccc1O") == "c 1 c c c c c 1 O"
    for smiles in ("CC(=O)O", "ClCC#N", "c1ccccc1O", "OC(Br)C=CC(F)(F)F"):
        assert formats.parse_smiles(formats.format_smiles(smiles) + " is it") == smiles
    assert formats.parse_smiles("CCO") == "CCO"
    assert formats.format_names(["Ann", "Ben"]) == "Ann Ben"
    assert formats.parse_names("Ann, Ben and Cal") == ["Ann", "Ben"]
    assert formats.parse_names("Ann Ben Cal.") == ["Ann", "Ben", "Cal"]
    assert formats.format_significant(81.84) == "81.8"
    assert formats.format_significant(0.04567) == "0.0457"
    assert formats.format_significant(1234.5) == "1230"


def test_format_smiles_refuses_unknown_characters():
    with pytest.raises(ValueError, match="not a SMILES"):
        formats.format_smiles("CC$x")


@pytest.mark.parametrize(
    ("parser", "text"),
    [(formats.parse_smiles, "the molecule"), (formats.parse_names, "nobody")],
)
def test_new_parsers_reject_text_without_an_answer(parser, text):
    with pytest.raises(ValueError):
        parser(text)


@pytest.mark.slow
def test_formats_line_up_with_smollm2_tokens():
    """Each unit of the spaced formats is one token, or a space and a digit, on SmolLM2."""
    from loramix.smollm2 import load_base_model

    _, tokenizer = load_base_model("smollm2")
    for text in (
        "C C ( = O ) O",
        "Cl C # N",
        "Rome",
        "Ann Ben Cal Dan Tom Max",
        "Rome Paris London Boston Chicago",
    ):
        pieces = [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]
        assert [p.strip() for p in pieces] == text.split(), pieces
    pieces = [tokenizer.decode([i]) for i in tokenizer("c 1 c c c c c 1 O")["input_ids"]]
    assert "".join(pieces) == "c 1 c c c c c 1 O" and all(len(p.strip()) <= 1 for p in pieces)

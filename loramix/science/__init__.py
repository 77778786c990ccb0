"""The science case study's data: a miniature of the X-LoRA paper's (Buehler & Buehler 2024).

Question/answer generators for four expert domains, each with forward tasks and an inverse
(design) task, plus cross-domain composite questions held out from all expert training:

    biology    DNA codons -> peptide, reverse complement, DNA design        (Biopython)
    chemistry  molar mass, atom count, formula design                        (periodictable)
    proteins   net charge at pH 7, molecular weight, peptide design          (Biopython ProtParam)
    mechanics  stress, Hooke's law, unit conversion, cross-section design    (pint)

Ground truth always comes from the library; `verify` judges a model's answer by the same
library. Text formats are chosen to line up with SmolLM2 tokens (see `formats`). The domain
libraries are the optional extra `science`: pip install 'loramix[science]'.
"""

from loramix.science.datasets import write_datasets
from loramix.science.registry import COMPOSITE, DOMAINS, TASKS, get_task, verify
from loramix.science.task import Example, Task

__all__ = [
    "COMPOSITE",
    "DOMAINS",
    "TASKS",
    "Example",
    "Task",
    "get_task",
    "verify",
    "write_datasets",
]

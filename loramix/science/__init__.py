"""The science case study's data: a miniature of the X-LoRA paper's (Buehler & Buehler 2024).

Question/answer generators for eight expert domains, each with forward tasks and an inverse
(design) task, plus cross-domain composite questions held out from all expert training:

    biology      DNA codons -> peptide, reverse complement, DNA design      (Biopython)
    chemistry    molar mass, atom count, formula design                      (periodictable)
    proteins     net charge at pH 7, molecular weight, peptide design        (Biopython ProtParam)
    mechanics    stress, Hooke's law, unit conversion, cross-section design  (pint)
    quantum      HOMO-LUMO gap, dipole moment; molecule design               (tblite table, RDKit)
    mathematics  derivative, linear equation, expansion, quadratic design    (SymPy)
    reasoning    orderings, who-lives-where; ordering design                 (z3)
    bioinspired  foams (Gibson-Ashby), rule of mixtures, nacre; designs      (pint)

Ground truth always comes from the library; `verify` judges a model's answer by the same
library. Text formats are chosen to line up with SmolLM2 tokens (see `formats`). The domain
libraries are the optional extra `science`: pip install 'loramix[science]'.

The rest of the package builds and shows the model: `pipeline` (`loramix science retrain`:
data, experts, the multitask LoRA, gates chosen on dev, the test report, the export),
`add_domain`, `bundle` (the exported folder) and `demo` (`make demo`).
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

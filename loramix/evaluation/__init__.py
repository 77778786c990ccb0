"""Evaluation workflows over the core: scores of base, experts, their average and X-LoRA.

    runner.py     evaluate: NLL per completion token and verified greedy answers per system
    report.py     EvalReport: the tables, eval.json and eval.md
    bootstrap.py  95% bootstrap intervals of the per-set numbers
    plots.py      scalings heatmaps and expert usage (the plots extra)

The science case study's targets and verifier are in `loramix.science.targets`.
"""

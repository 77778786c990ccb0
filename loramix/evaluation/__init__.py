"""Evaluation workflows: running (NLL, greedy answers), the report, plots."""

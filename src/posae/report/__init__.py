"""The conclusions: the paper's quoted numbers, the verdicts on its claims, the figures and tables."""

"""Baselines of the paper's comparisons (issue 4, in progress): adapter-tuning so far."""

"""Evaluation: tasks built from real text, scorers, a runner that prefills once per sample, reports."""

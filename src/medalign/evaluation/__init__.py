"""Evaluation: metrics on plain arrays, zero-shot, probes, text metrics, alignment scores, plots."""

"""Evaluation of trained SAEs: shared probe primitives, metrics, probes, ablations, position structure."""

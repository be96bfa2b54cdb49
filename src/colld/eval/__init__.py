"""Evaluation of frozen encoders: SUPERB-style probes, teacher mimicry, efficiency, reports."""

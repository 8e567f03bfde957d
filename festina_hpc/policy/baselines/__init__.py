"""Baseline policies: re-implementations of the mechanisms of the systems Festina is compared with."""

"""Policies: pure decisions (placement, per-GPU control, scaling, consolidation) over a cluster view.

A policy reads a read-only ``ClusterView`` and the profiles, and returns
decisions as data. The simulator and the live daemon both carry those
decisions out; neither the policy nor its decisions know about Slurm, NVML,
the database or the clock.
"""

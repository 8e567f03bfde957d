"""festina-node: the GPU node side (Slurm hooks, the root-owned control service, energy accounting)."""

"""GPU backends: NVML on real GPUs, a profile-driven simulated GPU elsewhere."""

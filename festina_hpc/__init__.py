"""festina-hpc: energy-first serving of many LLMs on shared GPUs in a Slurm cluster.

The package implements Festina (arXiv 2606.30391). Profiles (``profiles``)
answer "how long and how much power" in constant time; GPU backends (``gpu``)
read and set the hardware; the admin CLI (``cli``) is a thin layer over both.
"""

__version__ = "0.1.0"

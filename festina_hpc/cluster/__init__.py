"""What the simulator, festinad and festina-node share about a cluster: its figures, the SLO defaults and
the arrival-rate meter.

The simulator (``sim/``), the live daemon (``daemon/``), the node side (``node/``) and the emulated
engine (``serve/``) build on this package, never on one another: ``figures`` holds the cluster's
physical figures (``ClusterConfig``, the usable memory fraction, the cold-start presets), ``slo`` the
default SLOs of a model on a GPU type, ``rate`` the one estimate of arrivals per second all drivers
keep. Its modules import nothing heavier than the profiles' specs, so a compute node's small install
can use them.
"""

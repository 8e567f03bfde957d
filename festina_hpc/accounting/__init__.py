"""Energy accounting on top of the database: report formats, plots, Slurm AdminComment, Prometheus metrics.

The figures come from the accounting queries (``festina_hpc.db.accounting``) over the rollups that
ingest maintains; this package only presents them (tables, CSV, JSON, PNG), hands a job's total to
Slurm, and exposes live figures passed in by festinad or festina-node as Prometheus metrics.
"""

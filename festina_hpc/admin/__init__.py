"""The admin side of festina: status snapshots, consolidation plans and the client of festinad's admin API."""

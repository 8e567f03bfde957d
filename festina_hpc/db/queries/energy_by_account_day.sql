-- energy_by_account_day: GPU energy charged to each Slurm job's account per UTC day (not gateway accounts).
--
-- Reads the account_energy_daily rollup (maintained at ingest), never the raw samples.
-- An instance's energy is charged to the account of its Slurm job ('' when it has none).
--
-- Parameters:
--   :since  start of the range, inclusive (a UTC timestamp; days whose day_at >= :since)
--   :until  end of the range, exclusive (days whose day_at < :until)
--
-- Columns: account, day_at (the day's 00:00 UTC), energy_j, energy_kwh
SELECT account,
       day_at,
       SUM(energy_j) AS energy_j,
       SUM(energy_j) / 3600000.0 AS energy_kwh
FROM account_energy_daily
WHERE day_at >= :since AND day_at < :until
GROUP BY account, day_at
ORDER BY day_at, account

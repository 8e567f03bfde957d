-- energy_by_user: GPU energy per Slurm user (and account) over a range of UTC days, largest first.
--
-- Reads the account_energy_daily rollup; the user is the owner of the instance's Slurm job.
--
-- Parameters:
--   :since  start of the range, inclusive (days whose day_at >= :since)
--   :until  end of the range, exclusive (days whose day_at < :until)
--
-- Columns: user_name, account, energy_j, energy_kwh
SELECT user_name,
       account,
       SUM(energy_j) AS energy_j,
       SUM(energy_j) / 3600000.0 AS energy_kwh
FROM account_energy_daily
WHERE day_at >= :since AND day_at < :until
GROUP BY user_name, account
ORDER BY SUM(energy_j) DESC, user_name, account

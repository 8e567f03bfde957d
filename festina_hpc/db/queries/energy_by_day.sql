-- energy_by_day: all GPU energy per UTC day, split into what instances used and idle energy.
--
-- Reads the node_energy_hourly rollup (its day_at column, so no date function is needed).
--
-- Parameters:
--   :since  start of the range, inclusive (hours whose hour_at >= :since)
--   :until  end of the range, exclusive (hours whose hour_at < :until)
--
-- Columns: day_at (the day's 00:00 UTC), energy_j, attributed_energy_j, idle_energy_j, energy_kwh
SELECT day_at,
       SUM(energy_j) AS energy_j,
       SUM(energy_j) - SUM(idle_energy_j) AS attributed_energy_j,
       SUM(idle_energy_j) AS idle_energy_j,
       SUM(energy_j) / 3600000.0 AS energy_kwh
FROM node_energy_hourly
WHERE hour_at >= :since AND hour_at < :until
GROUP BY day_at
ORDER BY day_at

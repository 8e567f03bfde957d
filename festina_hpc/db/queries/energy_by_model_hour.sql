-- energy_by_model_hour: GPU energy attributed to each model per UTC hour.
--
-- Reads the model_energy_hourly rollup: each instance's share of its GPUs' energy, summed per model.
--
-- Parameters:
--   :since  start of the range, inclusive (hours whose hour_at >= :since)
--   :until  end of the range, exclusive (hours whose hour_at < :until)
--
-- Columns: model, hour_at (the hour's start, UTC), energy_j, energy_kwh
SELECT model,
       hour_at,
       SUM(energy_j) AS energy_j,
       SUM(energy_j) / 3600000.0 AS energy_kwh
FROM model_energy_hourly
WHERE hour_at >= :since AND hour_at < :until
GROUP BY model, hour_at
ORDER BY hour_at, model

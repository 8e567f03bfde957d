-- slo_attainment_per_model: the share of each model's requests that met their TTFT and TBT SLOs.
--
-- Reads the requests table (indexed by model and arrival time); dropped requests count as missed.
--
-- Parameters:
--   :since  start of the range, inclusive (arrival_at >= :since)
--   :until  end of the range, exclusive (arrival_at < :until)
--
-- Columns: model, requests, slo_met, slo_attainment (0..1), mean_ttft_s, max_ttft_s, mean_tbt_s
SELECT model,
       COUNT(*) AS requests,
       SUM(CASE WHEN slo_met THEN 1 ELSE 0 END) AS slo_met,
       CAST(SUM(CASE WHEN slo_met THEN 1 ELSE 0 END) AS DOUBLE PRECISION) / COUNT(*) AS slo_attainment,
       AVG(ttft_s) AS mean_ttft_s,
       MAX(ttft_s) AS max_ttft_s,
       AVG(mean_tbt_s) AS mean_tbt_s
FROM requests
WHERE arrival_at >= :since AND arrival_at < :until
GROUP BY model
ORDER BY model

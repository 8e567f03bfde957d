-- energy_by_tenant: GPU energy charged to each gateway tenant (account and user of the request's key).
--
-- Reads the instance_energy_hourly and tenant_tokens_hourly rollups, never the raw samples.
-- An instance's energy in a UTC hour is split over the tenants whose requests it served in that
-- hour (arriving in it), in proportion to their tokens (prompt + output), so the tenants' energies
-- of an instance-hour sum to its energy exactly. An hour in which an instance served no tokens
-- (kept warm, loading) is charged to its Slurm job's account and user: keeping a model ready is the
-- serving account's cost. A GPU's idle energy (no instance's share) is charged to no one here.
--
-- Parameters:
--   :since  start of the range, inclusive (hours whose hour_at >= :since)
--   :until  end of the range, exclusive (hours whose hour_at < :until)
--
-- Columns: account, user_name, requests, tokens, energy_j, energy_kwh, energy_per_token_j
WITH served AS (
    SELECT instance_id, hour_at, CAST(SUM(tokens) AS DOUBLE PRECISION) AS tokens
    FROM tenant_tokens_hourly
    WHERE hour_at >= :since AND hour_at < :until
    GROUP BY instance_id, hour_at
    HAVING SUM(tokens) > 0
),
charged AS (
    SELECT t.account, t.user_name, t.requests, t.tokens,
           e.energy_j * t.tokens / s.tokens AS energy_j
    FROM instance_energy_hourly e
    JOIN served s ON s.instance_id = e.instance_id AND s.hour_at = e.hour_at
    JOIN tenant_tokens_hourly t ON t.instance_id = e.instance_id AND t.hour_at = e.hour_at
    UNION ALL
    SELECT COALESCE(j.account, ''), COALESCE(j.user_name, ''), 0, 0, e.energy_j
    FROM instance_energy_hourly e
    JOIN model_instances i ON i.id = e.instance_id
    LEFT JOIN slurm_jobs j ON j.job_id = i.slurm_job_id
    WHERE e.hour_at >= :since AND e.hour_at < :until
      AND NOT EXISTS (SELECT 1 FROM served s WHERE s.instance_id = e.instance_id AND s.hour_at = e.hour_at)
)
SELECT account,
       user_name,
       CAST(SUM(requests) AS BIGINT) AS requests,
       CAST(SUM(tokens) AS BIGINT) AS tokens,
       SUM(energy_j) AS energy_j,
       SUM(energy_j) / 3600000.0 AS energy_kwh,
       CASE WHEN SUM(tokens) > 0 THEN SUM(energy_j) / CAST(SUM(tokens) AS DOUBLE PRECISION) END AS energy_per_token_j
FROM charged
GROUP BY account, user_name
ORDER BY SUM(energy_j) DESC, account, user_name

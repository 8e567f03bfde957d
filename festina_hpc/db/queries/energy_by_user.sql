-- energy_by_user: GPU energy charged to each user: the gateway user of the requests an instance served.
--
-- Reads the instance_energy_hourly and tenant_tokens_hourly rollups, never the raw samples, and charges
-- exactly as energy_by_tenant does, summed per user: an instance's energy in a UTC hour is split over
-- the users of the API keys whose requests it served in that hour (arriving in it), in proportion to
-- their tokens (prompt + output). An hour in which an instance served no tokens (kept warm, loading) is
-- charged to its Slurm job's user ('' when it has no job). So the sum over users plus the GPUs' idle
-- energy (idle_energy_per_node) is the node energy.
--
-- One row per user, whatever accounts their keys belong to: this answers "how much did this person
-- use"; a user under several accounts is one row whose accounts column counts them, and
-- energy_by_tenant gives the split per (account, user).
--
-- Parameters:
--   :since  start of the range, inclusive (hours whose hour_at >= :since)
--   :until  end of the range, exclusive (hours whose hour_at < :until)
--
-- Columns: user_name, accounts (how many accounts they were charged under), requests, tokens,
--          energy_j, energy_kwh, energy_per_token_j
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
SELECT user_name,
       COUNT(DISTINCT account) AS accounts,
       CAST(SUM(requests) AS BIGINT) AS requests,
       CAST(SUM(tokens) AS BIGINT) AS tokens,
       SUM(energy_j) AS energy_j,
       SUM(energy_j) / 3600000.0 AS energy_kwh,
       CASE WHEN SUM(tokens) > 0 THEN SUM(energy_j) / CAST(SUM(tokens) AS DOUBLE PRECISION) END AS energy_per_token_j
FROM charged
GROUP BY user_name
ORDER BY SUM(energy_j) DESC, user_name

-- energy_per_token_per_model: each model's GPU energy, its requests' tokens, and the energy per token.
--
-- Energy from the model_energy_hourly rollup (whole hours: pass hour-aligned bounds), tokens from
-- the requests that arrived in the range. A model with energy but no tokens has NULL per-token figures.
--
-- Parameters:
--   :since  start of the range, inclusive (hour_at >= :since, arrival_at >= :since)
--   :until  end of the range, exclusive (hour_at < :until, arrival_at < :until)
--
-- Columns: model, energy_j, requests, prompt_tokens, output_tokens,
--          energy_per_output_token_j, energy_per_token_j (per prompt plus output token)
WITH energy AS (
    SELECT model, SUM(energy_j) AS energy_j
    FROM model_energy_hourly
    WHERE hour_at >= :since AND hour_at < :until
    GROUP BY model
), tokens AS (
    SELECT model,
           COUNT(*) AS requests,
           SUM(prompt_tokens) AS prompt_tokens,
           SUM(output_tokens) AS output_tokens
    FROM requests
    WHERE arrival_at >= :since AND arrival_at < :until
    GROUP BY model
)
SELECT e.model,
       e.energy_j,
       COALESCE(t.requests, 0) AS requests,
       COALESCE(t.prompt_tokens, 0) AS prompt_tokens,
       COALESCE(t.output_tokens, 0) AS output_tokens,
       e.energy_j / NULLIF(t.output_tokens, 0) AS energy_per_output_token_j,
       e.energy_j / NULLIF(t.prompt_tokens + t.output_tokens, 0) AS energy_per_token_j
FROM energy e
LEFT JOIN tokens t ON t.model = e.model
ORDER BY e.model

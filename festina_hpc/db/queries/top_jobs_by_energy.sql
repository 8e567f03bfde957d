-- top_jobs_by_energy: the Slurm jobs that used the most GPU energy, largest first.
--
-- Reads the job_energy rollup (each job's whole total, maintained at ingest) and slurm_jobs.
-- A job is in the range when its measured span [from_at, to_at] overlaps [:since, :until).
--
-- Parameters:
--   :since  start of the range, inclusive (to_at >= :since)
--   :until  end of the range, exclusive (from_at < :until)
--   :limit  how many jobs at most
--
-- Columns: job_id, name, user_name, account, partition, energy_j, energy_kwh, from_at, to_at
SELECT j.job_id,
       s.name,
       s.user_name,
       s.account,
       s.partition,
       j.energy_j,
       j.energy_j / 3600000.0 AS energy_kwh,
       j.from_at,
       j.to_at
FROM job_energy j
JOIN slurm_jobs s ON s.job_id = j.job_id
WHERE j.to_at >= :since AND j.from_at < :until
ORDER BY j.energy_j DESC, j.job_id
LIMIT :limit

-- power_per_node_hour: each node's GPU energy per UTC hour and its mean GPU power over the hour.
--
-- Reads the node_energy_hourly rollup. mean_power_w is the hour's energy over 3600 s: an hour
-- the samples only partly cover (the first and last of a range, a node powered off) reads low.
--
-- Parameters:
--   :since  start of the range, inclusive (hour_at >= :since)
--   :until  end of the range, exclusive (hour_at < :until)
--
-- Columns: node, hour_at (the hour's start, UTC), energy_j, idle_energy_j, mean_power_w
SELECT n.name AS node,
       h.hour_at,
       h.energy_j,
       h.idle_energy_j,
       h.energy_j / 3600.0 AS mean_power_w
FROM node_energy_hourly h
JOIN nodes n ON n.id = h.node_id
WHERE h.hour_at >= :since AND h.hour_at < :until
ORDER BY h.hour_at, n.name

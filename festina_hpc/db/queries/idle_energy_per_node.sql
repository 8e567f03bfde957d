-- idle_energy_per_node: each node's GPU energy and the part of it no instance used (idle energy).
--
-- Reads the node_energy_hourly rollup; idle energy is what no instance's share claimed (a GPU
-- without instances, or the unclaimed rest of a shared one).
--
-- Parameters:
--   :since  start of the range, inclusive (hours whose hour_at >= :since)
--   :until  end of the range, exclusive (hours whose hour_at < :until)
--
-- Columns: node, energy_j, idle_energy_j, idle_fraction (0..1), energy_kwh
SELECT n.name AS node,
       SUM(h.energy_j) AS energy_j,
       SUM(h.idle_energy_j) AS idle_energy_j,
       SUM(h.idle_energy_j) / NULLIF(SUM(h.energy_j), 0) AS idle_fraction,
       SUM(h.energy_j) / 3600000.0 AS energy_kwh
FROM node_energy_hourly h
JOIN nodes n ON n.id = h.node_id
WHERE h.hour_at >= :since AND h.hour_at < :until
GROUP BY n.name
ORDER BY n.name

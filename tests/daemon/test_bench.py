"""``festina bench gateway`` runs end to end on a small request count and prints one JSON object."""

from __future__ import annotations

import json

import pytest

from festina_hpc.cli.main import main


def test_bench_gateway_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FESTINA_CONFIG", raising=False)
    assert main(["bench", "gateway", "--requests", "20", "--concurrency", "4", "--tokens", "3", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["benchmark"] == "gateway" and figures["auth"].startswith("both")
    assert figures["req_per_s"] == figures["modes"][0]["requests_per_s_gateway"] > 0
    assert figures["overhead_p50_ms"] * 1000 == pytest.approx(figures["modes"][0]["added_latency_p50_us"])
    assert figures["overhead_p99_ms"] * 1000 == pytest.approx(figures["modes"][0]["added_latency_p99_us"])
    assert [row["mode"] for row in figures["modes"]] == ["stream", "no-stream"]
    for row in figures["modes"]:
        assert row["requests_per_s_gateway"] > 0 and row["requests_per_s_direct"] > 0
        assert row["latency_p50_us_gateway"] > 0 and "added_latency_p99_us" in row
        assert row["requests_per_s_gateway_auth"] > 0 and row["latency_p50_us_gateway_auth"] > 0
        assert row["auth_throughput_ratio"] == row["requests_per_s_gateway_auth"] / row["requests_per_s_gateway"]
    assert figures["req_per_s_auth"] == figures["modes"][0]["requests_per_s_gateway_auth"]
    assert figures["auth_throughput_ratio"] == figures["modes"][0]["auth_throughput_ratio"]
    assert 0 < figures["auth_cost_us_per_request"] < 1000
    assert figures["auth_cpu_ratio"] == figures["modes"][0]["auth_cpu_ratio"] > 0
    assert figures["modes"][0]["cpu_us_per_request_gateway_auth"] > 0

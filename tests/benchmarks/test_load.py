"""The load generator against a real server: two developers typing for a few seconds."""

from __future__ import annotations

import json
from xml.etree import ElementTree

import pytest

from ghostpen.benchmarks.load import (
    DEFAULT_FILES,
    LoadConfig,
    markdown,
    run_load,
    save,
    source_files,
)
from ghostpen.benchmarks.server_process import running_server


@pytest.mark.system
async def test_two_sessions_produce_a_sane_report() -> None:
    config = LoadConfig(
        sessions=2, duration_s=6, files=source_files(DEFAULT_FILES), warmup_s=1, think_rate=0.5
    )
    with running_server("--engine", "llama.cpp") as server:
        result = await run_load(server, config)
    assert result["sessions"] == 2 and result["duration_s"] >= 6
    assert result["requests"] > 0
    assert result["errors"] == {}
    assert 0 <= result["cancelled_fraction"] <= 1
    assert result["completions"] <= result["requests"]
    if result["completions"]:
        assert 0 < result["first_text_ms"]["p50"] <= result["total_ms"]["p50"]
    assert result["wasted_tokens"] >= 0
    assert result["server_cpu_s"] > 0 and result["server_peak_rss_mib"] > 100
    assert markdown([result]).count("\n") == 2


def test_a_sweep_is_saved_as_json_markdown_and_latency_plots(tmp_path) -> None:
    def point(sessions: int, p50: float) -> dict:
        latency = {"p50": p50, "p90": p50 * 2, "p99": p50 * 4, "max": p50 * 5, "n": 10}
        return {
            "sessions": sessions,
            "completions_per_s": 0.5,
            "first_text_ms": latency,
            "total_ms": latency,
            "cancelled_fraction": 0.5,
            "errors": {},
            "wasted_tokens": 0,
            "server_cpu_s": 1.0,
            "server_peak_rss_mib": 500,
        }

    save([point(1, 150), point(8, 900), point(64, 4000)], tmp_path / "sweep.json")
    assert json.loads((tmp_path / "sweep.json").read_text())[2]["sessions"] == 64
    assert (tmp_path / "sweep.md").read_text().count("\n") == 5
    for name in ("sweep_total.svg", "sweep_first_text.svg"):
        svg = ElementTree.parse(tmp_path / name).getroot()
        lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
        assert len(lines) == 3  # p50, p90, p99
        assert all(len(line.get("points").split()) == 3 for line in lines)

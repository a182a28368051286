"""The load generator against a real server: two developers typing for a few seconds."""

from __future__ import annotations

from benchmarks.load import DEFAULT_FILES, LoadConfig, markdown, run_load, source_files
from benchmarks.server_process import running_server


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

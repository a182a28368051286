from ghostpen.benchmarks.editor_agent import type_through
from ghostpen.benchmarks.typing_session import DEFAULT_FILE


async def test_typing_two_lines_through_the_agent_reports_what_it_measured(server) -> None:
    result = await type_through(f"127.0.0.1:{server.port}", DEFAULT_FILE, 60, 2, seed=0)
    keystrokes = result["keystrokes"]
    assert keystrokes == len("\n".join(DEFAULT_FILE.read_text().split("\n")[60:62]))
    assert result["requests_sent"] >= 1
    assert result["saved_by_debounce"] + result["requests_sent"] <= keystrokes
    assert 0 <= result["share_of_keystrokes_from_cache"] <= 1
    latency = result["agent_event_to_request_sent_ms"]
    assert latency["n"] >= 1 and 0 <= latency["p50"] <= latency["p99"] < 1000

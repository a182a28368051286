"""The console as a product manager uses it, in headless Chromium against the real server and
engine: clone the served template, edit it, preview its prompts on real code, register it, try
it beside the default with progress, start an experiment with it and promote it; each step
checked against the database. And what the console refuses: no login, a non-admin, a change
from another site, a malformed change."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest_asyncio

from ghostpen.server import experiments, prompts
from ghostpen.server.app import RunningServer, start_server
from ghostpen.server.auth import TokenFile
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import Settings
from ghostpen.server.telemetry.store import Store
from tests.chromium import open_page

ARTIFACTS = Path(__file__).parents[3] / "test-artifacts"
TRIAL_TASKS = 3
PREVIEWS = 2
EDIT = ("Path: {path}", "File: {path}")  # a product manager's change to the file header


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def console(server: RunningServer, settings: Settings, tmp_path_factory) -> AsyncIterator:
    """A server on the session's engine with a database of its own and logins: pm, an admin,
    and dev, who is not."""
    folder = tmp_path_factory.mktemp("console")
    tokens = TokenFile(folder / "tokens.json")
    logins = {user: tokens.add(user)[0] for user in ("pm", "dev")}
    own = dataclasses.replace(
        settings,
        auth=dataclasses.replace(settings.auth, tokens_file=str(tokens.path), admins="pm"),
        telemetry=dataclasses.replace(
            settings.telemetry,
            database=str(folder / "telemetry.db"),
            trial_tasks=TRIAL_TASKS,
            preview_samples=PREVIEWS,
        ),
    )
    running = await start_server(own, server.engine, Metrics())
    try:
        yield running, own, logins
    finally:  # the engine is the session's: stop only ours
        await running.server.stop(0)
        await running.web.cleanup()
        await running.trials.close()
        await running.dashboard.close()
        await running.writer.close()


def basic(token: str) -> dict[str, str]:
    """The header a browser's login sends: any user name, the token as the password."""
    return {"Authorization": "Basic " + base64.b64encode(f"x:{token}".encode()).decode()}


async def test_a_product_manager_edits_tries_and_ships_a_prompt_in_the_browser(
    console, tmp_path: Path
) -> None:
    running, own, logins = console
    url = f"http://127.0.0.1:{running.web_port}/dashboard/console"
    default = own.context.template
    async with open_page(url, tmp_path / "profile", basic(logins["pm"])) as page:
        await page.until("document.body.dataset.ready === '1'", 60)
        assert await page.evaluate("document.getElementById('default-template').textContent") == (
            f"{default}@v1"
        )
        clone = f"document.querySelector('tr[data-id=\"{default}@v1\"] .clone').click()"
        await page.evaluate(clone)
        await page.until("document.getElementById('editor-content').value.includes('body')", 30)
        await page.evaluate(
            f"""(() => {{
              const content = document.getElementById('editor-content');
              const [was, now] = {json.dumps(EDIT)};
              content.value = content.value.replaceAll(was, now);
              document.getElementById('editor-name').value = 'pm-header';
              document.getElementById('editor-note').value = 'say File, not Path';
              document.getElementById('preview').click();
            }})()"""
        )
        previews = await page.until(
            "(() => { const p = [...document.querySelectorAll('pre.prompt')]"
            ".map(e => e.textContent); return p.length ? p : null })()",
            120,
        )
        assert len(previews) == PREVIEWS
        assert all("# File: " in p and "# Path: " not in p for p in previews)

        await page.evaluate("document.getElementById('save').click()")
        saved = await page.until("document.getElementById('saved').textContent", 30)
        assert saved == "Registered pm-header@v1"

        await page.evaluate("document.getElementById('try').click()")
        rows = await page.until(
            "(() => { const r = [...document.querySelectorAll('#trial-scores tr[data-score]')]"
            ".map(e => [...e.children].map(c => c.textContent)); return r.length ? r : null })()",
            900,
        )
        progress = await page.evaluate(
            "[document.getElementById('trial-progress').value, "
            "document.getElementById('trial-progress').max]"
        )
        assert progress == [2 * TRIAL_TASKS, 2 * TRIAL_TASKS]
        assert [row[0] for row in rows] == ["exact match", "edit similarity"]
        assert all("CI" in row[3] for row in rows)
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(ARTIFACTS / "console.png")

        await page.evaluate(
            "document.getElementById('experiment-name').value = 'header-test';"
            "document.getElementById('start').click()"
        )
        assert await page.until("document.getElementById('started').textContent", 30) == (
            "Started header-test"
        )
        await page.until("!!document.querySelector('[data-experiment=\"header-test\"]')", 30)
        assert running.traffic.experiment is not None  # this server serves it at once
        assert running.traffic.experiment.name == "header-test"

        await page.evaluate(
            "window.confirm = () => true;"
            'document.querySelector(\'[data-experiment="header-test"] '
            'tr[data-arm="candidate"] .promote\').click()'
        )
        await page.until(
            "document.querySelector('[data-experiment=\"header-test\"] h3')"
            ".textContent.endsWith('promoted')",
            30,
        )

    store = Store.open(own.telemetry.database, own.cache_dir)
    try:
        made = prompts.version(store, "pm-header@v1")
        assert (made.author, made.parent) == ("pm", f"{default}@v1")
        assert made.note == "say File, not Path"
        assert EDIT[1] in made.content and EDIT[0] not in made.content
        started = experiments.get(store, "header-test")
        assert started is not None and started.started_by == "pm"
        assert [(a.name, a.template) for a in started.arms] == [
            ("control", ""),
            ("candidate", "pm-header@v1"),
        ]
        assert [(a.actor, a.action) for a in experiments.actions(store, "header-test")] == [
            ("pm", "start"),
            ("pm", "promote"),
        ]
        promoted = experiments.default(store)
        assert promoted is not None and promoted.template == "pm-header@v1"
    finally:
        store.close()
    trial = running.trials.recent()[-1]
    assert trial.status == "finished" and trial.done == 2 * TRIAL_TASKS
    scores = trial.view()["scores"]
    shown = {row[0]: row for row in rows}
    assert shown["exact match"][1] == f"{scores['exact']['default']:.3f}"
    assert shown["edit similarity"][2] == f"{scores['edit_similarity']['candidate']:.3f}"


async def test_the_console_refuses_strangers_non_admins_other_sites_and_bad_changes(
    console,
) -> None:
    running, _, logins = console
    root = f"http://127.0.0.1:{running.web_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{root}/dashboard/console") as answer:
            assert answer.status == 401
        async with http.get(f"{root}/dashboard/api/prompts", headers=basic(logins["dev"])) as a:
            assert a.status == 403 and "admins" in await a.text()
        pm = basic(logins["pm"])
        change = f"{root}/dashboard/api/experiments"
        elsewhere = {**pm, "Origin": "https://evil.example"}
        async with http.post(change, json={}, headers=elsewhere) as answer:
            assert answer.status == 403 and "evil.example" in await answer.text()
        async with http.post(change, data="name=x", headers=pm) as answer:
            assert answer.status == 400
            assert "application/json" in (await answer.json())["error"]
        one_arm = {"name": "x", "arms": [{"name": "a", "weight": 1}]}
        async with http.post(change, json=one_arm, headers=pm) as answer:
            assert answer.status == 400 and "2 to 8 arms" in (await answer.json())["error"]
        bad_weight = {"name": "x", "arms": [{"name": "a", "weight": "heavy"}] * 2}
        async with http.post(change, json=bad_weight, headers=pm) as answer:
            assert (
                answer.status == 400 and "weight must be a number" in (await answer.json())["error"]
            )
        huge = {"content": "x" * 70_000}
        async with http.post(f"{root}/dashboard/api/prompts/preview", json=huge, headers=pm) as a:
            assert a.status == 400 and "limit is 65536" in (await a.json())["error"]
        broken = {"content": "id = 'x'\nbody = 'no prefix placeholder'"}
        async with http.post(f"{root}/dashboard/api/prompts/preview", json=broken, headers=pm) as a:
            assert a.status == 400 and "the template" in (await a.json())["error"]
        async with http.get(f"{root}/dashboard/api/trials/nope", headers=pm) as answer:
            assert answer.status == 404

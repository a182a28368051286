"""Headless Chromium driven over the DevTools protocol (CDP), for tests that click through a
page as a person would: the page's own scripts run, its fetches go to the real server.

Only what the tests use: open a page (with headers such as a Basic login on every request),
evaluate JavaScript in it, wait until an expression holds (polled, with a deadline), and take
a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_S = 60.0
POLL_S = 0.1


class PageError(AssertionError):
    """The page threw, or an expression did not come true in time."""


class Page:
    def __init__(self, socket: aiohttp.ClientWebSocketResponse, session: str) -> None:
        self._socket = socket
        self._session = session
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = answer
        await self._socket.send_json(
            {"id": message_id, "method": method, "params": params, "sessionId": self._session}
        )
        result = await asyncio.wait_for(answer, START_S)
        if "error" in result:
            raise PageError(f"{method}: {result['error']}")
        return result.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """The expression's value (awaited if a promise), as JSON; PageError if it throws."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise PageError(
                f"{expression!r} threw: {details.get('exception', {}).get('description', details)}"
            )
        return result["result"].get("value")

    async def until(self, expression: str, timeout_s: float) -> Any:
        """The expression's first truthy value, polled until `timeout_s`. An expression that
        throws (the page is between documents, or not yet drawn) is polled again."""
        failure = ""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    try:
                        if value := await self.evaluate(expression):
                            return value
                    except PageError as error:
                        failure = str(error)
                    await asyncio.sleep(POLL_S)
        except TimeoutError:
            shown = await self.evaluate("document.getElementById('error')?.textContent || ''")
            raise PageError(
                f"{expression!r} did not hold within {timeout_s} s; the page says {shown!r}"
                + (f"; last: {failure}" if failure else "")
            ) from None

    async def screenshot(self, path: Path) -> None:
        """The whole page, as a PNG."""
        size = await self.evaluate("[document.body.scrollWidth, document.body.scrollHeight]")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=max(size[0], 1280), height=size[1], deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        async for message in self._socket:
            data = json.loads(message.data)
            answer = self._waiting.pop(data.get("id", -1), None)
            if answer is not None and not answer.done():
                answer.set_result(data)


@asynccontextmanager
async def open_page(
    url: str, profile: Path, headers: dict[str, str] | None = None
) -> AsyncIterator[Page]:
    """A fresh Chromium (its own profile) showing `url`, loaded, with `headers` on every
    request the page makes."""
    browser = await asyncio.create_subprocess_exec(
        "chromium", *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
        "about:blank", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert browser.stderr is not None
    try:
        endpoint = await asyncio.wait_for(_endpoint(browser.stderr), START_S)
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(endpoint, max_msg_size=0) as socket,
        ):
            await socket.send_json(
                {"id": 0, "method": "Target.createTarget", "params": {"url": "about:blank"}}
            )
            target = (await _answer(socket, 0))["targetId"]
            await socket.send_json(
                {
                    "id": -2,
                    "method": "Target.attachToTarget",
                    "params": {"targetId": target, "flatten": True},
                }
            )
            session = (await _answer(socket, -2))["sessionId"]
            page = Page(socket, session)
            try:
                await page.send("Page.enable")
                await page.send("Network.enable")
                if headers:
                    await page.send("Network.setExtraHTTPHeaders", headers=headers)
                await page.send("Page.navigate", url=url)
                here = f"location.href === {json.dumps(url)}"
                loaded = f"{here} && document.readyState === 'complete'"
                await page.until(loaded, START_S)
                yield page
            finally:
                await page.close()
    finally:
        browser.kill()
        await browser.wait()


async def _endpoint(stderr: asyncio.StreamReader) -> str:
    while line := await stderr.readline():
        found = re.search(rb"DevTools listening on (ws://\S+)", line)
        if found:
            return found[1].decode()
    raise PageError("chromium exited before it listened for DevTools")


async def _answer(socket: aiohttp.ClientWebSocketResponse, message_id: int) -> dict[str, Any]:
    async for message in socket:
        data = json.loads(message.data)
        if data.get("id") == message_id:
            if "error" in data:
                raise PageError(str(data["error"]))
            return data["result"]
    raise PageError("chromium closed its DevTools socket")

"""The dashboard's console (/dashboard/console): where a product manager changes what is served
without a terminal. Experiments: each arm's figures with their confidence sequences, start,
stop, promote. Prompts: clone a version, edit it, preview its prompts on real code, register it,
try it (server/trials.py) beside the default, and start an experiment with it.

It is one page (console.html) over a JSON API under /dashboard/api/. Everything is behind the
deployment's authentication (server/web.py); the console wants an admin besides (`admins`; the
developer at a server without authentication is one), since what it changes serves every
tenant. A change is made with a JSON body, which a page of another site cannot send without
the preflight this server never grants, and who made it is recorded as the viewer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from ghostpen.server import experiments, prompts
from ghostpen.server.arms import Traffic
from ghostpen.server.errors import InvalidInput, StoreUnavailable
from ghostpen.server.experiments import Arm
from ghostpen.server.identity import LOCAL, Identity
from ghostpen.server.settings import AuthSettings
from ghostpen.server.telemetry.arms_report import arms_report
from ghostpen.server.telemetry.store import Store
from ghostpen.server.telemetry.store_process import StoreProcess
from ghostpen.server.trials import Trials

MAX_BODY_BYTES = 64 * 1024  # a template is at most prompts.MAX_TEMPLATE_CHARS
MAX_NOTE_CHARS = 1024
EXPERIMENTS_SHOWN = 20  # the newest, each with its report
PAGE = "console.html"
log = logging.getLogger(__name__)
Viewer = Callable[[web.Request], Identity]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Console:
    def __init__(
        self,
        reader: StoreProcess,
        writer: StoreProcess,
        traffic: Traffic,
        trials: Trials,
        auth: AuthSettings,
        adapters: dict[str, str],
    ) -> None:
        self._reader = reader  # the dashboard's own process
        self._writer = writer  # the telemetry writer's: one process writes
        self._traffic = traffic
        self._trials = trials
        self._auth = auth
        self._adapters = adapters
        self._page = resources.files("ghostpen.server").joinpath(PAGE).read_text("utf-8")

    def routes(self, viewer: Viewer) -> list[web.RouteDef]:
        def admitted(handler: Handler) -> Handler:
            async def checked(request: web.Request) -> web.StreamResponse:
                who = viewer(request)
                if who != LOCAL and not self._auth.admin(who.user):
                    raise web.HTTPForbidden(
                        text=f"{who.user} may not change what is served: the setting `admins` "
                        "names who may"
                    )
                if request.method == "POST":
                    _same_origin(request)
                try:
                    return await handler(request)
                except InvalidInput as error:
                    return web.json_response({"error": str(error)}, status=400)
                except StoreUnavailable as error:
                    return web.json_response({"error": str(error)}, status=503)
                except web.HTTPException:
                    raise
                except Exception as error:  # the page shows why, not a bare 500
                    log.exception("console: %s %s", request.method, request.path)
                    return web.json_response(
                        {"error": f"{type(error).__name__}: {error}"}, status=500
                    )

            return checked

        def by(request: web.Request) -> str:
            return viewer(request).user

        async def page(_: web.Request) -> web.Response:
            return web.Response(text=self._page, content_type="text/html")

        async def experiments_now(_: web.Request) -> web.Response:
            return web.json_response(await self._reader.call(_overview))

        async def start(request: web.Request) -> web.Response:
            body = await _body(request)
            arms = tuple(_arm(item) for item in _field(body, "arms", list))
            name = _field(body, "name", str)
            note = _field(body, "note", str, "")
            await self._writer.call(
                experiments.start, name, arms, by(request), self._adapters, _note(note)
            )
            await self._traffic.refresh(self._writer.call)  # this server serves it at once
            return web.json_response({"started": name})

        async def stop(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            await self._writer.call(experiments.stop, name, by(request))
            await self._traffic.refresh(self._writer.call)
            return web.json_response({"stopped": name})

        async def promote(request: web.Request) -> web.Response:
            name, body = request.match_info["name"], await _body(request)
            arm = await self._writer.call(
                experiments.promote, name, _field(body, "arm", str), by(request)
            )
            await self._traffic.refresh(self._writer.call)
            return web.json_response({"default": _arm_json(arm)})

        async def prompt_list(_: web.Request) -> web.Response:
            listed = await self._reader.call(prompts.listed)
            return web.json_response(
                {
                    "default": self._traffic.default.template.template_id,
                    "versions": [
                        {
                            "id": v.template.template_id,
                            "name": v.template.name,
                            "version": v.template.version,
                            "hash": v.template.content_hash,
                            "parent": v.parent,
                            "author": v.author,
                            "note": v.note,
                            "created_ms": v.created_ms,
                        }
                        for v in listed
                    ],
                }
            )

        async def prompt_show(request: web.Request) -> web.Response:
            found = await self._reader.call(prompts.version, request.match_info["reference"])
            return web.json_response({"id": found.template.template_id, "content": found.content})

        async def prompt_preview(request: web.Request) -> web.Response:
            draft = prompts.checked(_field(await _body(request), "content", str))
            shown = await self._trials.preview(self._traffic.default, draft)
            return web.json_response({"template": draft.template_id, "samples": shown})

        async def prompt_new(request: web.Request) -> web.Response:
            body = await _body(request)
            made = await self._writer.call(
                prompts.new,
                _field(body, "name", str),
                _field(body, "parent", str),
                _field(body, "content", str),
                by(request),
                _note(_field(body, "note", str, "")),
            )
            return web.json_response({"id": made.template_id, "hash": made.content_hash})

        async def trial_start(request: web.Request) -> web.Response:
            reference = _field(await _body(request), "template", str)
            candidate = await self._reader.call(prompts.resolve, reference)
            trial = self._trials.start(self._traffic.default, candidate)
            return web.json_response(trial.view())

        async def trial_show(request: web.Request) -> web.Response:
            trial = self._trials.get(request.match_info["trial"])
            if trial is None:
                return web.json_response({"error": "no such trial (servers keep the last "
                                          "`trials_kept`)"}, status=404)  # fmt: skip
            return web.json_response(trial.view())

        api = "/dashboard/api"
        return [
            web.get("/dashboard/console", admitted(page)),
            web.get(f"{api}/experiments", admitted(experiments_now)),
            web.post(f"{api}/experiments", admitted(start)),
            web.post(api + "/experiments/{name}/stop", admitted(stop)),
            web.post(api + "/experiments/{name}/promote", admitted(promote)),
            web.get(f"{api}/prompts", admitted(prompt_list)),
            web.post(f"{api}/prompts", admitted(prompt_new)),
            web.post(f"{api}/prompts/preview", admitted(prompt_preview)),
            web.get(api + "/prompts/{reference}", admitted(prompt_show)),
            web.post(f"{api}/trials", admitted(trial_start)),
            web.get(api + "/trials/{trial}", admitted(trial_show)),
        ]


def _overview(store: Store) -> dict[str, object]:
    """Every experiment with its report, newest first, the actions on them, and the default."""
    default = experiments.default(store)
    return {
        "experiments": [
            arms_report(store, e.name)
            for e in reversed(experiments.listed(store)[-EXPERIMENTS_SHOWN:])
        ],
        "default": _arm_json(default) if default else None,
    }


def _arm_json(arm: Arm) -> dict[str, object]:
    return arm.__dict__ | {"settings": dict(arm.settings)}


def _arm(item: object) -> Arm:
    """An arm as the page sends it: {name, weight, template?, adapter?, settings?}."""
    if not isinstance(item, dict):
        raise InvalidInput(f"an arm is an object, not {type(item).__name__}")
    settings = _field(item, "settings", dict, {})
    return Arm(
        _field(item, "name", str),
        float(_field(item, "weight", (int, float))),
        _field(item, "template", str, ""),
        _field(item, "adapter", str, ""),
        tuple(sorted((str(k), str(v)) for k, v in settings.items())),
    )


def _note(note: str) -> str:
    if len(note) > MAX_NOTE_CHARS:
        raise InvalidInput(f"the note has {len(note)} characters; the limit is {MAX_NOTE_CHARS}")
    return note


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise InvalidInput(f"a change is sent as application/json, not {request.content_type!r}")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise InvalidInput(
            f"the body has {request.content_length} bytes; the limit is {MAX_BODY_BYTES}"
        )
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidInput(f"the body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise InvalidInput(f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body is a JSON object")
    return body


_MISSING = object()


def _field(body: dict[str, Any], name: str, kind: Any, default: Any = _MISSING) -> Any:
    value = body.get(name, default)
    if value is _MISSING:
        raise InvalidInput(f"{name} is missing")
    if not isinstance(value, kind) or isinstance(value, bool):
        wanted = kind.__name__ if isinstance(kind, type) else "a number"
        raise InvalidInput(f"{name} must be {wanted}, not {type(value).__name__}")
    return value


def _same_origin(request: web.Request) -> None:
    """A change from a page of this server only: browsers name the page's origin."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise web.HTTPForbidden(text=f"a change from {origin} is refused: not this server's page")

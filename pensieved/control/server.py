"""The control API: JSON over HTTP on the Unix socket (`pensievectl` is its client).

    GET  /v1/status     StatusResponse
    GET  /v1/config     ConfigResponse: the config in force (the file's may be broken)
    POST /v1/stop       StopResponse, then a graceful stop (drain, exit 0)
    POST /v1/reload     ReloadResult: re-read the config file now and apply it
    POST /v1/validate   ValidateRequest -> ValidateResponse: the daemon's validator, and what
                        loading that file would change
    GET  /v1/models     ModelsResponse: every configured model, loaded or not
    POST /v1/models/load, /v1/models/unload
                        ModelActionRequest -> ModelActionResponse: load a model now, or unload
                        it (its KV caches saved) once its requests are done

Only the socket's owner can connect (0600 in a 0700 directory), so there is no
authentication here.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import tornado.web
from pydantic import BaseModel, ValidationError

from pensieve.wire import (
    ConfigResponse,
    ErrorResponse,
    ModelActionRequest,
    ModelActionResponse,
    ModelsResponse,
    ReloadResult,
    StatusResponse,
    StopResponse,
    ValidateRequest,
    ValidateResponse,
)
from pensieved.errors import PensieveError

log = logging.getLogger("pensieved.control")


class Controller(Protocol):
    """What the control API drives: the daemon."""

    def status(self) -> StatusResponse: ...

    def running_config(self) -> ConfigResponse: ...

    def stop_soon(self) -> StopResponse: ...

    async def reload(self, trigger: str) -> ReloadResult: ...

    def validate(self, path: str) -> ValidateResponse: ...

    def models(self) -> ModelsResponse: ...

    async def model_action(self, action: str, name: str) -> ModelActionResponse: ...


class _Handler(tornado.web.RequestHandler):
    def initialize(self, controller: Controller) -> None:
        self.controller = controller

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def reply(self, data: BaseModel, status: int = 200) -> None:
        self.set_status(status)
        self.finish(data.model_dump_json())

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            message = exc.log_message
        elif status_code >= 500:
            message = "internal error in pensieved's control API; the details are in its log"
        else:
            message = self._reason
        self.finish(ErrorResponse(error=message).model_dump_json())


class StatusHandler(_Handler):
    def get(self) -> None:
        self.reply(self.controller.status())


class ConfigHandler(_Handler):
    def get(self) -> None:
        self.reply(self.controller.running_config())


class StopHandler(_Handler):
    def post(self) -> None:
        self.reply(self.controller.stop_soon())


class ReloadHandler(_Handler):
    async def post(self) -> None:
        self.reply(await self.controller.reload("control"))


class ValidateHandler(_Handler):
    def post(self) -> None:
        try:
            request = ValidateRequest.model_validate(json.loads(self.request.body or b"{}"))
        except (ValueError, ValidationError) as exc:
            raise tornado.web.HTTPError(400, f"bad validate request: {exc}") from None
        self.reply(self.controller.validate(request.path))


class ModelsHandler(_Handler):
    def get(self) -> None:
        self.reply(self.controller.models())


class ModelActionHandler(_Handler):
    async def post(self, action: str) -> None:
        try:
            request = ModelActionRequest.model_validate(json.loads(self.request.body or b"{}"))
        except (ValueError, ValidationError) as exc:
            raise tornado.web.HTTPError(400, f"bad models {action} request: {exc}") from None
        try:
            self.reply(await self.controller.model_action(action, request.name))
        except PensieveError as exc:
            # Unknown name (no model serves it), a load that failed: the user's to fix.
            raise tornado.web.HTTPError(409, str(exc)) from None


class _NotFound(_Handler):
    def prepare(self) -> None:
        raise tornado.web.HTTPError(404, f"no control operation at {self.request.path}")


def make_control_app(controller: Controller) -> tornado.web.Application:
    args = {"controller": controller}
    return tornado.web.Application(
        [
            (r"/v1/status", StatusHandler, args),
            (r"/v1/config", ConfigHandler, args),
            (r"/v1/stop", StopHandler, args),
            (r"/v1/reload", ReloadHandler, args),
            (r"/v1/validate", ValidateHandler, args),
            (r"/v1/models", ModelsHandler, args),
            (r"/v1/models/(load|unload)", ModelActionHandler, args),
        ],
        default_handler_class=_NotFound,
        default_handler_args=args,
        log_function=lambda handler: log.debug(
            "%d %s %s", handler.get_status(), handler.request.method, handler.request.uri
        ),
    )

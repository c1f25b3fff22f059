"""POST /v1/chat/completions: the Messages handler's machinery in OpenAI's dialect.

Admission, slots, the prompt cache, the queue, limits, security and disconnect handling are
the shared `GenerationHandler`'s; this handler only converts the request, picks the encoder
and speaks OpenAI's error envelope (every error on this path, before or during the stream).
"""

from __future__ import annotations

import asyncio
import json

from pensieved.api import forward
from pensieved.api.handlers import GenerationHandler
from pensieved.api.openai.convert import to_generation_request
from pensieved.api.openai.errors import openai_error
from pensieved.api.openai.stream import OpenAIStream, whole_completion
from pensieved.engine.interface import GenerationSession
from pensieved.wire.openai import ChatCompletionRequest


class ChatCompletionsHandler(GenerationHandler):
    endpoint = "chat_completions"

    async def post(self) -> None:
        body = self.parse_body(ChatCompletionRequest)
        request = to_generation_request(body)
        stream = bool(body.stream)
        route = self.upstreams.route_for(body.model)
        if route is not None:
            # Validated and converted like a local request (so refusals are the same), then
            # passed on: the upstream speaks this dialect itself.
            self._task = asyncio.ensure_future(
                forward.chat_completions(
                    self,
                    self.upstreams,
                    self.engine,
                    route,
                    body.model,
                    stream,
                    self.request_id,
                    self.stream_error,
                )
            )
            await self._watch_hangup()
            return
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        limit = body.max_completion_tokens or body.max_tokens
        what = (
            f"POST /v1/chat/completions model={body.model} stream={str(stream).lower()} "
            f"max_tokens={limit if limit is not None else 'unset'}"
        )

        async def run(session: GenerationSession) -> None:
            if stream:
                await self.stream_events(session, OpenAIStream(body.model, include_usage))
            else:
                self.write_json(await whole_completion(body.model, session.events()))

        await self.generate(body.model, request, what, run, stream=stream)

    def error_reply(
        self, status: int, error_type: str, message: str, exc: BaseException | None
    ) -> tuple[int, str]:
        status, envelope = openai_error(status, message, exc)
        return status, json.dumps(envelope.model_dump(mode="json"), ensure_ascii=False)

    def stream_error(self, status: int, error_type: str, message: str, exc: Exception) -> bytes:
        return OpenAIStream.error(openai_error(status, message, exc)[1])

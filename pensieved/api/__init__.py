"""The Anthropic Messages API over HTTP: handlers, wire models, the SSE encoder, limits, security.
Imports tornado, `pensieve` and the engine's interface and types; the engine never imports it."""

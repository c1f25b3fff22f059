"""Upstream routes: model names served by another inference server (`model.upstreams`).

A peer of the engine: the API layer calls it, it never calls the API layer. pool.py picks the
route and URL and makes the call, transport.py is the HTTP client, failures.py maps every
upstream failure to Pensieve's exceptions, openai.py converts to and from Chat Completions.
"""

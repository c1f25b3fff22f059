"""OpenAI's Chat Completions API on the same engine as the Messages API.

models.py holds the wire shapes (usable by a server and by a client), convert.py turns a
request into the engine's types, stream.py encodes engine events as `chat.completion.chunk`s,
errors.py maps failures to OpenAI's error envelope and handlers.py serves the routes.
"""

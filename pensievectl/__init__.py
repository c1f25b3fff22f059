"""pensievectl: control a running pensieved over its Unix socket, and check its config.

Startup must stay fast: nothing here imports Tornado or llama_cpp, and pydantic (through
`pensieved.config`) only for the commands that validate a config.
"""

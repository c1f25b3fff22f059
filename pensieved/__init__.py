"""pensieved: a local server for the Anthropic Messages API, backed by llama.cpp."""

__version__ = "0.1.0"

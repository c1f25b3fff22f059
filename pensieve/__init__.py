"""The contract both binaries share: config models, paths, control wire models and client, socket
files, run records, post-mortems, exit codes. Imports the stdlib, platformdirs and pydantic only."""

__version__ = "0.1.0"

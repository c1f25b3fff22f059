"""The contract pensieved and pensievectl share: config models, paths, control wire models, the
control socket's files, run records and exit codes. Imports the stdlib and pydantic only."""

__version__ = "0.1.0"

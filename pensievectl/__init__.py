"""pensievectl, the control CLI: start, stop, status, reload, validate, config, launchd/systemd.
Imports `pensieve` and the stdlib (psutil, pydantic lazily); never pensieved, Tornado, llama_cpp."""

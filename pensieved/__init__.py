"""pensieved, the daemon: the HTTP API (`api/`) calls the engine (`engine/`, the only importer of
llama_cpp); `control/` serves the Unix socket. Imports `pensieve` (shared), never `pensievectl`."""

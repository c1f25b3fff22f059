"""pensieved, the daemon: lifecycle, listeners, hot reload, API (`api/`), engine (`engine/`, the
only llama_cpp importer), control socket (`control/`). Imports `pensieve`, never pensievectl."""

"""pensievectl, the control client: talks to pensieved over its Unix socket. Imports `pensieve`
(shared) and the stdlib, pydantic only to validate; never tornado, llama_cpp or `pensieved`."""

"""The inference engine: models, slots, batching, sampling, grammars, output routing, KV caches.
llama_cpp via `llama.py` only; may import `pensieve`, `errors`; never api, control, tornado."""

"""The control plane: a small JSON API on a Unix socket for `pensievectl`.

`sockets` and `wire`-free helpers here stay cheap to import (stdlib only) because
`pensievectl` uses them; only `server` imports Tornado.
"""

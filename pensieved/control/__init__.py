"""The daemon's side of the control API: Tornado handlers on the Unix socket (`server`).
Imports `pensieve` (wire models), Tornado and pydantic; the engine only through `Controller`."""

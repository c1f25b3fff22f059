"""Capture the requests a given Claude Code release sends, in the corpus's file format.

`python -m tests.claude_code_capture --version X --out DIR` installs that release with npm,
runs it offline against `server.CaptureServer` (a stand-in that answers like the Messages
API, with scripted replies) and writes one JSON file per request plus a README.md table.
See docs/claude-code.md.
"""

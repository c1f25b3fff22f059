"""A local stand-in for the Hugging Face Hub, speaking the part of its protocol huggingface_hub
uses to pull a model, so that `pensievectl pull` runs for real with no internet:

- `GET /api/models/{repo}/revision/{rev}`: the commit and the file list (`siblings`);
- `HEAD /{repo}/resolve/{rev}/{file}`: 302 to a content URL, with `X-Repo-Commit`,
  `X-Linked-Etag` (the sha256) and `X-Linked-Size`, as the Hub answers for an LFS file;
- `GET /cdn/{repo}/{file}`: the bytes, with `Content-Length`, `ETag` and `Range` (206).

Failures on demand: a gated repo (401 with `X-Error-Code: GatedRepo`), corrupt bytes, a
connection dropped halfway, and a transfer that stalls halfway until released.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)  # file names served with a flipped byte
    drop_once: set[str] = field(default_factory=set)  # file names cut off halfway, once
    stall: set[str] = field(default_factory=set)  # file names that stop halfway until release
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    authorized: list[tuple[str, str]] = field(default_factory=list)  # (path, Authorization)
    url: str = ""
    cdn_url: str = ""

    def add(self, repo: str, name: str, data: bytes) -> None:
        self.repos.setdefault(repo, {})[name] = HubFile(data)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _gated(self, repo: str) -> bool:
            if repo in hub.gated:
                self._send(
                    401,
                    {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"},
                    b'{"error": "Access to this repo is restricted"}',
                )
                return True
            return False

        def _route(self) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            if auth := self.headers.get("Authorization"):
                hub.authorized.append((self.path, auth))
            path = self.path.split("?")[0]
            if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
                self._api(match[1])
            elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                self._resolve(match[1], match[3])
            elif match := re.fullmatch(r"/cdn/([^/]+/[^/]+)/(.+)", path):
                self._content(match[1], match[2])
            else:
                self._send(404, {"X-Error-Code": "RepoNotFound"})

        do_GET = _route
        do_HEAD = _route

        def _api(self, repo: str) -> None:
            if self._gated(repo):
                return
            if repo not in hub.repos:
                self._send(404, {"X-Error-Code": "RepoNotFound"}, b"{}")
                return
            body = json.dumps(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": COMMIT,
                    "siblings": [{"rfilename": name} for name in hub.repos[repo]],
                }
            ).encode()
            self._send(200, {"Content-Type": "application/json"}, body)

        def _resolve(self, repo: str, name: str) -> None:
            if self._gated(repo):
                return
            file = hub.repos.get(repo, {}).get(name)
            if file is None:
                self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
                return
            self._send(
                302,
                {
                    # Another host name, as the Hub's CDN is: huggingface_hub does not follow
                    # it on HEAD and reads the metadata from this answer.
                    "Location": f"{hub.cdn_url}/cdn/{repo}/{name}",
                    "X-Repo-Commit": COMMIT,
                    "X-Linked-Etag": f'"{file.sha256}"',
                    "X-Linked-Size": str(len(file.data)),
                    "ETag": '"git-object-id"',
                },
            )

        def _content(self, repo: str, name: str) -> None:
            file = hub.repos.get(repo, {}).get(name)
            if file is None:
                self._send(404, {})
                return
            data = file.data
            if name in hub.corrupt:
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            start = 0
            if (wanted := self.headers.get("Range")) and (m := re.match(r"bytes=(\d+)-", wanted)):
                start = int(m[1])
            headers = {"ETag": f'"{file.sha256}"', "Content-Length": str(len(data) - start)}
            status = 200
            if start:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            half = len(data) // 2
            if name in hub.drop_once and start < half:
                hub.drop_once.discard(name)
                self.wfile.write(data[start:half])
                self.wfile.flush()
                self.close_connection = True
                return
            if name in hub.stall and start < half:
                self.wfile.write(data[start:half])
                self.wfile.flush()
                hub.stalled.set()
                hub.release.wait(60)
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    hub.cdn_url = f"http://localhost:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.release.set()
        server.shutdown()
        server.server_close()

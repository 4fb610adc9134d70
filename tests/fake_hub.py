"""A tiny stand-in for the Hugging Face Hub over HTTP, for download tests (never the internet).

It serves the three endpoints huggingface_hub uses to download: model info
(`GET /api/models/ORG/NAME[/revision/REV]`, with file sizes), and file metadata and contents
(`HEAD` / `GET /ORG/NAME/resolve/REV/FILE`, with Range requests). Point HF_ENDPOINT at `url`.
Every request is logged in `requests` as (method, path, Range header), so a test can tell which
bytes were fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"commit": sha, "files": {name: bytes}, "refs": {rev: sha}}
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, folder: str) -> str:
        """Publish the files of `folder` as `repo_id` at branch main; returns the commit."""
        files = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = f.read()
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                              + repo_id.encode()).hexdigest()
        self.repos[repo_id] = {"commit": commit, "files": files}
        return commit

    def fetched(self, suffix: str) -> list[tuple[str, str | None]]:
        """(method, Range) of every request for a file whose path ends with `suffix`."""
        return [(m, r) for m, p, r in self.requests if p.endswith(suffix)]

    # --- the endpoints -------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo_id = "/".join(parts[2:4])
            rev = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
            return self._info(h, repo_id, rev)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(h, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._error(h, 404, "EntryNotFound")

    def _repo(self, h, repo_id: str, rev: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound")
            return None
        if rev not in ("main", repo["commit"]):
            self._error(h, 404, "RevisionNotFound")
            return None
        return repo

    def _info(self, h, repo_id: str, rev: str) -> None:
        repo = self._repo(h, repo_id, rev)
        if repo is None:
            return
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": repo["commit"], "private": False,
                           "siblings": [{"rfilename": n, "size": len(d)} for n, d in repo["files"].items()]}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _file(self, h, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self._repo(h, repo_id, rev)
        if repo is None:
            return
        data = repo["files"].get(name)
        if data is None:
            return self._error(h, 404, "EntryNotFound")
        start, stop, status = 0, len(data), 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            a, _, b = rng[6:].partition("-")
            start, stop, status = int(a), min(len(data), int(b) + 1 if b else len(data)), 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", repo["commit"])
        h.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        h.send_header("Content-Length", str(stop - start))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        h.end_headers()
        if not head:
            h.wfile.write(data[start:stop])

    @staticmethod
    def _error(h, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

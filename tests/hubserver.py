"""The smallest Hugging Face Hub that the real huggingface_hub client talks to, on loopback.

No package on PyPI serves local repositories offline with the endpoints the
client calls, so the tests run this one: a threaded HTTP server over a tree
of repositories the tests build (`Repo`: files at a commit, branches that
point at commits). It answers

    GET  /api/models/ORG/NAME[/revision/REV]     repo info (sha, siblings)
    GET  /api/models/ORG/NAME/tree/REV[/PATH]    the file tree, with sizes and LFS sha256
    HEAD /ORG/NAME/resolve/REV/PATH              X-Repo-Commit, ETag, sizes
    GET  /ORG/NAME/resolve/REV/PATH              the file, or a byte range (206, Content-Range)

and counts what it sends (`bytes_sent`, per path). For the robustness tests it
can fail on purpose: `fail_rate` of the requests get a 500, a 429 with
Retry-After, or a connection dropped mid-body; `lie` makes it send a short
body under a full Content-Length. `tests/test_hub.py` checks the server
against huggingface_hub itself (hf_hub_download, snapshot_download).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    """A repository: commits (commit id -> folder of files) and branches (name -> commit)."""

    commits: dict[str, Path] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def add_commit(self, folder: Path, branch: str = "main") -> str:
        h = hashlib.sha1()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(folder).as_posix().encode())
                h.update(sha256_of(p).encode())
        h.update(str(len(self.commits)).encode())
        commit = h.hexdigest()
        self.commits[commit] = folder
        self.branches[branch] = commit
        return commit

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.branches.get(rev)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


class Hub:
    """The server and its state; `with Hub() as hub:` starts it on a free loopback port."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.bytes_sent: Counter = Counter()
        self.requests: Counter = Counter()
        self.faults: Counter = Counter()  # failures injected, by kind
        self.fail_rate = 0.0
        self.lie = False
        self.rng = random.Random(0)
        self.lock = threading.Lock()
        self._sha: dict[Path, str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    def sha(self, path: Path) -> str:
        if path not in self._sha:
            self._sha[path] = sha256_of(path)
        return self._sha[path]

    def reset_counts(self) -> None:
        with self.lock:
            self.bytes_sent.clear()
            self.requests.clear()

    @property
    def total_sent(self) -> int:
        return sum(self.bytes_sent.values())

    def fault(self) -> str | None:
        """None, or the failure to inject into this request."""
        with self.lock:
            if self.fail_rate and self.rng.random() < self.fail_rate:
                kind = self.rng.choice(["500", "429", "drop"])
                self.faults[kind] += 1
                return kind
        return None


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _json(self, doc: object, status: int = 200) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, msg: str, code: str | None = None) -> None:
            body = json.dumps({"error": msg}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", msg)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            with hub.lock:
                hub.requests[path] += 1
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if m:
                return self._info(m.group(1), m.group(2) or "main")
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if m:
                return self._tree(m.group(1), m.group(2), m.group(3) or "")
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(m.group(1), m.group(2), m.group(3), head)
            self._error(404, f"no route {path}")

        def _commit(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            from urllib.parse import unquote

            commit = repo.resolve(unquote(rev))
            if commit is None:
                self._error(404, "Invalid rev id", "RevisionNotFound")
                return None
            return repo, commit

        def _files(self, folder: Path) -> list[Path]:
            return sorted(p for p in folder.rglob("*") if p.is_file())

        def _info(self, repo_id: str, rev: str) -> None:
            got = self._commit(repo_id, rev)
            if got is None:
                return
            repo, commit = got
            folder = repo.commits[commit]
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": False,
                    "siblings": [{"rfilename": p.relative_to(folder).as_posix()} for p in self._files(folder)],
                }
            )

        def _tree(self, repo_id: str, rev: str, sub: str) -> None:
            got = self._commit(repo_id, rev)
            if got is None:
                return
            repo, commit = got
            folder = repo.commits[commit]
            out = []
            for p in self._files(folder):
                rel = p.relative_to(folder).as_posix()
                if sub and not rel.startswith(sub.rstrip("/") + "/"):
                    continue
                size = p.stat().st_size
                entry = {"type": "file", "path": rel, "size": size, "oid": hashlib.sha1(p.read_bytes()[:4096]).hexdigest()}
                if p.suffix == ".safetensors":
                    entry["lfs"] = {"oid": hub.sha(p), "size": size, "pointerSize": 134}
                out.append(entry)
            self._json(out)

        def _resolve(self, repo_id: str, rev: str, rel: str, head: bool) -> None:
            fault = None if head else hub.fault()
            if fault == "500":
                return self._error(500, "internal error (injected)")
            if fault == "429":
                self.send_response(429)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            got = self._commit(repo_id, rev)
            if got is None:
                return
            repo, commit = got
            from urllib.parse import unquote

            f = repo.commits[commit] / unquote(rel)
            if not f.is_file():
                return self._error(404, "Entry not found", "EntryNotFound")
            size = f.stat().st_size
            etag = hub.sha(f) if f.suffix == ".safetensors" else hashlib.sha1(f.read_bytes()).hexdigest()
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            status = 200
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if not m or int(m.group(1)) >= size:
                    return self._error(416, "range not satisfiable")
                start = int(m.group(1))
                end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
                status = 206
            n = end - start + 1
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            with open(f, "rb") as fh:
                fh.seek(start)
                data = fh.read(n)
            if hub.lie or fault == "drop":
                cut = len(data) // 2
                self.wfile.write(data[:cut])
                with hub.lock:
                    hub.bytes_sent[rel] += cut
                self.wfile.flush()
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.close_connection = True
                return
            self.wfile.write(data)
            with hub.lock:
                hub.bytes_sent[rel] += len(data)

    return Handler


def hub_env(hub: Hub, home: Path) -> dict[str, str]:
    """Environment for a process that should talk to `hub` with its own empty cache."""
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "NO_PROXY": "127.0.0.1,localhost",
    }

"""A local stand-in for the Hub endpoints behind ``huggingface_hub.create_repo`` and ``upload_folder``.

huggingface_hub reads ``HF_ENDPOINT`` at import time: run the client in a subprocess with ``env=hub.env(hf_home)``.
Endpoints (``{repo}`` is ``owner/name``; ``{rev}`` is URL-quoted, ``refs/heads/`` optional):

- ``POST /api/repos/create``: 409 for an existing repo, which ``create_repo(exist_ok=True)`` accepts.
- ``GET /api/models/{repo}[/revision/{rev}]``: minimal repo info, ``xetEnabled: false``.
- ``POST /api/validate-yaml``: accepts any README.md metadata.
- ``POST /api/models/{repo}/preupload/{rev}``: "lfs" for files of 10 MiB or more or with a NUL byte in their first
  512 bytes, "regular" (base64 inside the commit) for the others, or for all files with ``lfs=False``.
- ``POST /{repo}.git/info/lfs/objects/batch``: always the "basic" transfer, to an upload URL on this server;
  ``PUT`` there (no Authorization, like a presigned URL) keeps the bytes if their sha256 is the oid.
- ``POST /api/models/{repo}/commit/{rev}[?create_pr=1]``: the ndjson commit.
- ``POST /api/models/{repo}/discussions``, ``GET .../discussions/{num}``: the pull request that 2.x's pipelined
  upload opens before committing to ``refs/pr/{num}`` (recorded as a ``create_pr`` commit to the PR's base).

Anything else answers 404 and lands in ``hub.unexpected``. Errors carry the ``X-Error-Code`` that
``hf_raise_for_status`` reads (RepoNotFound, RevisionNotFound); a wrong token gets 401 "Invalid credentials in
Authorization header", a plain ``HfHubHTTPError``. The fake never reports remote file oids, so nothing is skipped
as unchanged.

Xet: no server answer keeps huggingface_hub 2.x off Xet: with ``hf_xet`` installed, it sends every file that
preupload marks "lfs" through Xet (``xet-write-token``, unexpected here). So ``hub.env()`` sets
``HF_HUB_DISABLE_XET=1`` when ``lfs=True`` (2.x then takes ``create_commit`` and plain LFS), and ``lfs=False``
keeps 2.x on its default path (``_upload_pipeline.py``) with every file inline. Should a 1.x client offer "xet"
in the LFS batch request, the answer is "basic"; before 1.0, ``xetEnabled`` decided.

Checked by running against huggingface_hub 2.4.0 (hf_xet 1.8.0) in both modes. Not run against 1.x: its
differences that this fake handles (``private`` instead of ``visibility`` in create_repo, the transfer
negotiation) come from reading, not from a test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_STORAGE = "/fake-lfs-storage/"
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"
PR_REF = re.compile(r"refs/pr/(\d+)")


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> tuple:
    header = message.encode("ascii", "replace").decode()  # a header value must be latin-1, on one line
    headers = {"X-Error-Message": header, **({"X-Error-Code": code} if code else {}), **(headers or {})}
    return status, {"error": message}, headers


class FakeHub:
    """``existing_branches``: the branches every repo has; ``token``: if set, the only one accepted (401 else);
    ``fail_commit``: the commit endpoint answers 500 (or this status, if an int); ``lfs``: see the module doc."""

    def __init__(self, *, existing_branches=("main",), token=None, fail_commit: bool | int = False, lfs=True):
        self.branches, self.token, self.fail_commit, self.lfs = set(existing_branches), token, fail_commit, lfs
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "type"}
        self.commits: list[dict] = []  # {"repo_id", "revision", "create_pr", "summary", "files", "lfs"}
        self.authorizations: list[str] = []
        self.unexpected: list[str] = []
        self._lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self._prs: dict[tuple[str, int], dict] = {}  # (repo, num) -> {"base", "title"}
        self._heads: dict[tuple[str, str], str] = {}  # (repo, branch or PR ref) -> commit oid
        self._lock = threading.Lock()
        self._routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda groups, query, body: (200, {"errors": [], "warnings": []}, {})),
            ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", self._repo_info),
            ("POST", rf"/api/models/{REPO}/preupload/{REV}", self._preupload),
            ("POST", rf"/api/models/{REPO}/commit/{REV}", self._commit),
            ("POST", rf"/api/models/{REPO}/discussions", self._open_pr),
            ("GET", rf"/api/models/{REPO}/discussions/(?P<num>\d+)", self._pr_details),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", rf"{LFS_STORAGE}(?P<oid>[0-9a-f]{{64}})", self._lfs_put),
        ]

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def env(self, hf_home) -> dict[str, str]:
        """os.environ for a huggingface_hub subprocess that talks to this fake, without the user's Hub token."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
        env.update(HF_ENDPOINT=self.url, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
        env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        env.pop("HF_HUB_DISABLE_XET", None)
        if self.lfs:
            env["HF_HUB_DISABLE_XET"] = "1"
        return env

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        body = _read_body(handler)  # always, to keep the keep-alive connection in step
        auth = handler.headers.get("Authorization")
        if auth is not None:
            with self._lock:
                self.authorizations.append(auth)
        if self.token and auth != f"Bearer {self.token}" and not url.path.startswith(LFS_STORAGE):
            status, payload, headers = _error(401, "Invalid credentials in Authorization header")
        else:
            status, payload, headers = self._route(handler.command, url.path, parse_qs(url.query), body)
        data = json.dumps(payload).encode()
        handler.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers, "Content-Length": len(data)}.items():
            handler.send_header(key, str(value))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def _route(self, method: str, path: str, query: dict, body: bytes) -> tuple:
        for route_method, pattern, endpoint in self._routes:
            if route_method == method and (match := re.fullmatch(pattern, path)):
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                if "rev" in groups:
                    groups["rev"] = groups["rev"].removeprefix("refs/heads/")
                try:
                    return endpoint(groups, query, body)
                except (KeyError, TypeError, ValueError, IndexError) as exc:
                    return _error(400, f"FakeHub: malformed request: {exc!r}")
        with self._lock:
            self.unexpected.append(f"{method} {path}")
        return _error(404, f"FakeHub: no endpoint for {method} {path}")

    # Endpoints: (URL groups, query, body) -> (status, JSON payload, headers)

    def _check(self, repo: str, rev: str | None = None) -> tuple | None:
        with self._lock:
            if repo not in self.repos:
                return _error(404, f"Repository {repo} not found", "RepoNotFound")
            pr = PR_REF.fullmatch(rev or "")
            if rev is not None and rev not in self.branches and not (pr and (repo, int(pr[1])) in self._prs):
                return _error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return None

    def _create_repo(self, groups, query, body) -> tuple:
        payload = json.loads(body)
        repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        # 2.x sends "visibility", 1.x "private"; neither when the caller passes private=None.
        private = payload.get("private", {"private": True, "public": False}.get(payload.get("visibility")))
        with self._lock:
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}, {}
            self.repos[repo] = {"private": private, "type": payload.get("type") or "model"}
        return 200, {"url": f"{self.url}/{repo}", "name": repo}, {}

    def _repo_info(self, groups, query, body) -> tuple:
        repo, rev = groups["repo"], groups.get("rev", "main")
        if error := self._check(repo, rev):
            return error
        with self._lock:
            info = {"id": repo, "sha": self._heads.get((repo, rev), "0" * 40), "xetEnabled": False}
            return 200, {**info, "private": bool(self.repos[repo]["private"])}, {}

    def _preupload(self, groups, query, body) -> tuple:
        if error := self._check(groups["repo"], groups["rev"]):
            return error
        files = []
        for file in json.loads(body)["files"]:
            lfs = self.lfs and (file["size"] >= LFS_MIN_SIZE or b"\0" in base64.b64decode(file["sample"]))
            files.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": files}, {}

    def _lfs_batch(self, groups, query, body) -> tuple:
        payload = json.loads(body)
        ref = (payload.get("ref") or {}).get("name")  # absent with create_pr
        if error := self._check(groups["repo"], ref and ref.removeprefix("refs/heads/")):
            return error
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            with self._lock:
                if obj["oid"] not in self._lfs_objects:  # else no actions: the content is there already
                    entry["actions"] = {"upload": {"href": f"{self.url}{LFS_STORAGE}{obj['oid']}", "expires_in": 900}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, groups, query, body) -> tuple:
        if hashlib.sha256(body).hexdigest() != groups["oid"]:
            return _error(400, "FakeHub: the uploaded content does not match its sha256")
        with self._lock:
            self._lfs_objects[groups["oid"]] = body
        return 200, {}, {}

    def _commit(self, groups, query, body) -> tuple:
        repo, rev, create_pr = groups["repo"], groups["rev"], query.get("create_pr") == ["1"]
        if error := self._check(repo, rev):
            return error
        if self.fail_commit:  # Retry-After 0: 2.x's pipelined upload retries a 5xx commit 5 times, else for 23 s
            status = 500 if self.fail_commit is True else int(self.fail_commit)
            return _error(status, "FakeHub: commit failed (fail_commit)", headers={"Retry-After": "0"})
        header, *operations = [json.loads(line) for line in body.splitlines() if line.strip()]
        if header["key"] != "header":
            raise ValueError("the first line is not the commit header")
        files, lfs = {}, []
        for operation in operations:
            key, value = operation["key"], operation["value"]
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                with self._lock:
                    content = self._lfs_objects.get(value["oid"])
                if content is None or value.get("size", len(content)) != len(content):
                    return _error(422, f"FakeHub: the LFS object of {value['path']} was not uploaded")
                files[value["path"]] = content
                lfs.append(value["path"])
            else:
                return _error(400, f"FakeHub: unsupported commit operation {key!r}")
        summary = header["value"]["summary"]
        with self._lock:
            pr = PR_REF.fullmatch(rev)
            num = self._new_pr(repo, rev, summary) if create_pr else int(pr[1]) if pr else None
            oid = hashlib.sha1(f"{repo}:{len(self.commits)}".encode()).hexdigest()
            self._heads[(repo, f"refs/pr/{num}" if num else rev)] = oid
            base = self._prs[(repo, num)]["base"] if num else rev
            commit = {"repo_id": repo, "revision": base, "create_pr": bool(num), "summary": summary}
            self.commits.append({**commit, "files": files, "lfs": lfs})
        response = {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}"}
        if create_pr:
            response["pullRequestUrl"] = f"{self.url}/{repo}/discussions/{num}"
        return 200, response, {}

    def _new_pr(self, repo: str, base: str, title: str) -> int:  # under self._lock
        num = 1 + sum(r == repo for r, _ in self._prs)
        self._prs[(repo, num)] = {"base": base, "title": title}
        return num

    def _open_pr(self, groups, query, body) -> tuple:
        payload = json.loads(body)
        if error := self._check(groups["repo"]):
            return error
        if not payload.get("pullRequest"):
            return _error(400, "FakeHub: only pull requests are supported")
        with self._lock:
            num = self._new_pr(groups["repo"], "main", payload["title"])  # against the default branch
        return 200, {"num": num, "url": f"{self.url}/{groups['repo']}/discussions/{num}", "pullRequest": True}, {}

    def _pr_details(self, groups, query, body) -> tuple:
        repo, num = groups["repo"], int(groups["num"])
        with self._lock:
            pr = self._prs.get((repo, num))
        if pr is None:
            return _error(404, f"Discussion {num} not found")
        details = {"num": num, "title": pr["title"], "status": "draft", "isPullRequest": True, "events": []}
        details.update(author={"name": "fake"}, createdAt="2024-01-01T00:00:00.000Z", filesWithConflicts=[])
        details.update(repo={"name": repo, "type": "model"}, changes={"base": f"refs/heads/{pr['base']}"})
        return 200, details, {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's HTTP client uses

    def do_GET(self) -> None:
        self.server.hub._serve(self)  # type: ignore[attr-defined]

    do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = do_GET

    def log_message(self, format, *args) -> None:
        pass


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    rfile = handler.rfile
    if handler.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return rfile.read(int(handler.headers.get("Content-Length") or 0))
    chunks = []
    while (size := int(rfile.readline().split(b";")[0], 16)) > 0:
        chunks.append(rfile.read(size))
        rfile.readline()
    while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
        pass
    return b"".join(chunks)

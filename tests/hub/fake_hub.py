"""A local stand-in for the Hub: the endpoints behind ``create_repo`` and ``upload_folder`` (writes), and those
behind ``list_repo_files``, ``model_info``, ``list_repo_tree``, ``snapshot_download``, ``hf_hub_download`` and
``parse_safetensors_file_metadata`` for repos served from a local folder with ``hub.serve(repo_id, folder)`` (reads).

huggingface_hub reads ``HF_ENDPOINT`` at import time: run the client in a subprocess with ``env=hub.env(hf_home)``.
For a machine without a network, ``with refused_endpoint() as url`` and ``client_env(url, hf_home)``.
Endpoints (``{repo}`` is ``owner/name``; ``{rev}`` is URL-quoted, ``refs/heads/`` optional):

Writes:

- ``POST /api/repos/create``: 409 for an existing repo, which ``create_repo(exist_ok=True)`` accepts.
- ``POST /api/validate-yaml``: accepts any README.md metadata.
- ``POST /api/models/{repo}/preupload/{rev}``: "lfs" for files of 10 MiB or more or with a NUL byte in their first
  512 bytes, "regular" (base64 inside the commit) for the others, or for all files with ``lfs=False``.
- ``POST /{repo}.git/info/lfs/objects/batch``: always the "basic" transfer, to an upload URL on this server;
  ``PUT`` there (no Authorization, like a presigned URL) keeps the bytes if their sha256 is the oid.
- ``POST /api/models/{repo}/commit/{rev}[?create_pr=1]``: the ndjson commit.
- ``POST /api/models/{repo}/discussions``, ``GET .../discussions/{num}``: the pull request that 2.x's pipelined
  upload opens before committing to ``refs/pr/{num}`` (recorded as a ``create_pr`` commit to the PR's base).

Reads (``{rev}`` is a served branch or its commit oid):

- ``GET /api/models/{repo}[/revision/{rev}]``: the repo info: ``sha`` (the commit), ``siblings`` (with sizes,
  blob ids and LFS info when ``?blobs=true``, as ``files_metadata=True`` asks), ``gated``, ``private``,
  ``xetEnabled: false``. A repo that was only created (not served) gets a minimal info, as before.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&cursor=``: files (``oid``, ``size``, ``lfs``) and
  folders, sorted, ``tree_page_size`` per page with a ``Link: <...>; rel="next"`` header, as the Hub paginates.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a regular file answers 200 with ``X-Repo-Commit``, ``ETag`` (its
  git blob id), ``Content-Length`` and ``Range`` support (206, ``Content-Range``; 416 past the end). An LFS file
  (by the preupload rule above; safetensors files have NUL bytes) answers 302 with ``X-Repo-Commit``,
  ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``, to ``{cdn_url}/fake-cdn/{sha256}``: the same server under
  ``localhost`` instead of ``127.0.0.1``, another origin, so the client neither follows the HEAD's redirect nor
  forwards the token, as with the Hub's CDN. The CDN serves ranges too and answers 400 to a request that carries
  an Authorization (as S3 does with a signed URL). ``hub.requests`` records method, path, Range and whether a
  token came, for every request.

Faults, each as the Hub answers (``X-Error-Code`` and ``X-Error-Message`` headers, read by
``hf_raise_for_status``): a repo that does not exist, or is private without a token in ``access``: 401
``RepoNotFound`` without a token, 404 with one; a gated repo (``gated=True``): info and tree are public, files
(resolve, so downloads and header reads) get ``GatedRepo``: 401 "Access to model {repo} is restricted. You must
have access to it and be authenticated to access it. Please log in." without a token, 403 "... is restricted and
you are not in the authorized list. Visit {url} to ask for access." with one not in ``access``; a revision that
does not exist: 404 ``RevisionNotFound``; a missing file: 404 ``EntryNotFound`` with ``X-Repo-Commit``; no
network: ``refused_endpoint()``, a bound port that never listens, so connections are refused at once.

Anything else answers 404 and lands in ``hub.unexpected``. With ``token=...``, any other token (or none) gets 401
"Invalid credentials in Authorization header", a plain ``HfHubHTTPError``. The fake never reports remote file oids
to uploads, so nothing is skipped as unchanged.

Xet, uploads: no server answer keeps huggingface_hub 2.x off Xet: with ``hf_xet`` installed, it sends every file
that preupload marks "lfs" through Xet (``xet-write-token``, unexpected here). So ``hub.env()`` sets
``HF_HUB_DISABLE_XET=1`` when ``lfs=True`` (2.x then takes ``create_commit`` and plain LFS), and ``lfs=False``
keeps 2.x on its default path (``_upload_pipeline.py``) with every file inline. Should a 1.x client offer "xet"
in the LFS batch request, the answer is "basic"; before 1.0, ``xetEnabled`` decided. Xet, downloads: a client uses
Xet only for files whose resolve answer has ``X-Xet-*`` headers or whose tree entry has a ``xetHash``; the fake
sends neither, so downloads stay on plain HTTP with or without ``HF_HUB_DISABLE_XET`` (tested both ways).

Checked by running against huggingface_hub 2.4.0 (hf_xet 1.8.0): writes in both modes, reads with and without
Xet disabled. The reads (test_fake_hub.py and tests/faults/test_hub_faults.py) also passed against 1.33.0 (httpx
0.28.1, on the GPU machine). The write side was not run against 1.x: its differences there (``private`` instead
of ``visibility`` in create_repo, the transfer negotiation) come from reading. The Hub's own answers (statuses,
error codes, gate messages, the CDN redirect) come from reading huggingface_hub's sources (``hf_raise_for_status``,
``get_hf_file_metadata``) and published transcripts of the real Hub's answers, not from the real Hub. Versions
before 1.0 listed a snapshot's files from the info's ``siblings``, which the fake fills too (not run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_STORAGE = "/fake-lfs-storage/"
CDN = "/fake-cdn/"
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"
PR_REF = re.compile(r"refs/pr/(\d+)")


def is_lfs(data: bytes) -> bool:
    """What the Hub stores in LFS here: 10 MiB or more, or binary (a NUL byte in the first 512 bytes)."""
    return len(data) >= LFS_MIN_SIZE or b"\0" in data[:512]


class Blob(NamedTuple):
    """A served file: its bytes, its git blob id (of the LFS pointer, for an LFS file) and sha256."""

    data: bytes
    oid: str
    sha256: str
    lfs: bool

    @classmethod
    def of(cls, data: bytes) -> Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        lfs = is_lfs(data)
        stored = _lfs_pointer(sha256, len(data)) if lfs else data
        return cls(data, hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest(), sha256, lfs)

    def tree_entry(self) -> dict:
        """The tree API's fields for this file (without "path")."""
        lfs = {"lfs": {"oid": self.sha256, "size": len(self.data), "pointerSize": self._pointer_size}}
        return {"type": "file", "oid": self.oid, "size": len(self.data), **(lfs if self.lfs else {})}

    def sibling_metadata(self) -> dict:
        """The model info's sibling fields with ``blobs=True`` (without "rfilename")."""
        lfs = {"lfs": {"sha256": self.sha256, "size": len(self.data), "pointerSize": self._pointer_size}}
        return {"size": len(self.data), "blobId": self.oid, **(lfs if self.lfs else {})}

    @property
    def _pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, len(self.data)))


class Request(NamedTuple):
    """One request as the fake saw it: method, path with query, Range header, whether it had an Authorization."""

    method: str
    path: str
    range: str | None
    auth: bool


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _ranged(data: bytes, header: str | None) -> tuple[int, bytes, dict]:
    """A GET's status, body and headers for one ``Range: bytes=a-b`` (or ``a-``, ``-n``); other forms get it all."""
    headers = {"Accept-Ranges": "bytes"}
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if match is None or match.groups() == ("", ""):
        return 200, data, headers
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
    else:  # the last n bytes
        start, end = max(len(data) - int(last), 0), len(data) - 1
    if start >= len(data) or start > end:
        return 416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"}
    return 206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}


def client_env(endpoint: str, hf_home, *, disable_xet: bool = True) -> dict[str, str]:
    """os.environ for a huggingface_hub subprocess that talks to ``endpoint``: online, its own ``hf_home``, without
    the user's Hub token (set ``HF_TOKEN`` on the result to pass one), ``HF_HUB_DISABLE_XET`` as asked."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QTOOL_DEBUG")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.pop("HF_HUB_DISABLE_XET", None)
    if disable_xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    return env


@contextmanager
def refused_endpoint() -> Iterator[str]:
    """The URL of a local port that refuses connections (bound, never listening, so no other server takes it
    meanwhile): a machine with no network, as huggingface_hub sees it. Use with :func:`client_env`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> tuple:
    header = message.encode("ascii", "replace").decode()  # a header value must be latin-1, on one line
    headers = {"X-Error-Message": header, **({"X-Error-Code": code} if code else {}), **(headers or {})}
    return status, {"error": message}, headers


class FakeHub:
    """``existing_branches``: the branches every created repo has; ``token``: if set, the only one accepted (401
    else); ``fail_commit``: the commit endpoint answers 500 (or this status, if an int); ``lfs``: see the module doc;
    ``tree_page_size``: entries per page of the tree API (the Hub's is 1000)."""

    def __init__(
        self, *, existing_branches=("main",), token=None, fail_commit: bool | int = False, lfs=True, tree_page_size=1000
    ):
        self.branches, self.token, self.fail_commit, self.lfs = set(existing_branches), token, fail_commit, lfs
        self.tree_page_size = tree_page_size
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "type"}
        self.commits: list[dict] = []  # {"repo_id", "revision", "create_pr", "summary", "files", "lfs"}
        self.authorizations: list[str] = []
        self.requests: list[Request] = []
        self.unexpected: list[str] = []
        self._lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self._prs: dict[tuple[str, int], dict] = {}  # (repo, num) -> {"base", "title"}
        self._heads: dict[tuple[str, str], str] = {}  # (repo, branch or PR ref) -> commit oid
        self._served: dict[str, dict] = {}  # repo_id -> {"gated", "private", "access", "refs": {branch: commit}}
        self._snapshots: dict[str, dict[str, Blob]] = {}  # commit oid -> {path: blob}
        self._lock = threading.Lock()
        self._routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda groups, query, body, headers: (200, {"errors": []}, {})),
            ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?", self._repo_info),
            ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?", self._tree),
            ("POST", rf"/api/models/{REPO}/preupload/{REV}", self._preupload),
            ("POST", rf"/api/models/{REPO}/commit/{REV}", self._commit),
            ("POST", rf"/api/models/{REPO}/discussions", self._open_pr),
            ("GET", rf"/api/models/{REPO}/discussions/(?P<num>\d+)", self._pr_details),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", rf"{LFS_STORAGE}(?P<oid>[0-9a-f]{{64}})", self._lfs_put),
            ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", self._resolve),
            ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)", self._resolve),
            ("GET", rf"{CDN}(?P<sha256>[0-9a-f]{{64}})", self._cdn),
            ("HEAD", rf"{CDN}(?P<sha256>[0-9a-f]{{64}})", self._cdn),
        ]

    def __enter__(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self.cdn_url = f"http://localhost:{port}"  # the same server, another origin (see the module doc)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def env(self, hf_home) -> dict[str, str]:
        """os.environ for a huggingface_hub subprocess that talks to this fake, without the user's Hub token."""
        return client_env(self.url, hf_home, disable_xet=self.lfs)

    def serve(self, repo_id: str, folder, *, revision="main", gated=False, private=False, access=()) -> str:
        """Serve the files of ``folder`` (read now, so later changes to it are not seen) as the model repo
        ``repo_id`` at the branch ``revision``; returns the commit oid. Serve again to add another branch.

        ``gated``: the repo's info and file listing are public, its files need a token in ``access`` (else 401
        without a token, 403 with another one, both ``GatedRepo``). ``private``: everything needs a token in
        ``access``; without one the repo does not exist (401 without a token, 404 with another one, ``RepoNotFound``).
        """
        folder = Path(folder)
        files = {}
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and not name.startswith((".git/", ".cache/huggingface/")):
                files[name] = Blob.of(path.read_bytes())
        tree = "\n".join(f"{name} {blob.oid}" for name, blob in files.items())
        commit = hashlib.sha1(f"{repo_id}\n{revision}\n{tree}".encode()).hexdigest()
        with self._lock:
            self._snapshots[commit] = files
            served = self._served.setdefault(repo_id, {"refs": {}})
            served.update(gated=gated, private=private, access={f"Bearer {t}" for t in access})
            served["refs"][revision] = commit
            self.repos.setdefault(repo_id, {"private": private, "type": "model"})
        return commit

    def refs(self, repo_id: str) -> dict[str, str]:
        """The served branches of ``repo_id`` and their commit oids."""
        with self._lock:
            return dict(self._served[repo_id]["refs"])

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        body = _read_body(handler)  # always, to keep the keep-alive connection in step
        auth = handler.headers.get("Authorization")
        with self._lock:
            self.requests.append(Request(handler.command, handler.path, handler.headers.get("Range"), auth is not None))
            if auth is not None:
                self.authorizations.append(auth)
        if self.token and auth != f"Bearer {self.token}" and not url.path.startswith((LFS_STORAGE, CDN)):
            status, payload, headers = _error(401, "Invalid credentials in Authorization header")
        else:
            status, payload, headers = self._route(
                handler.command, url.path, parse_qs(url.query), body, handler.headers
            )
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        content_type = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        handler.send_response(status)
        for key, value in {"Content-Type": content_type, **headers, "Content-Length": len(data)}.items():
            handler.send_header(key, str(value))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def _route(self, method: str, path: str, query: dict, body: bytes, headers) -> tuple:
        for route_method, pattern, endpoint in self._routes:
            if route_method == method and (match := re.fullmatch(pattern, path)):
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                if "rev" in groups:
                    groups["rev"] = groups["rev"].removeprefix("refs/heads/")
                try:
                    return endpoint(groups, query, body, headers)
                except (KeyError, TypeError, ValueError, IndexError) as exc:
                    return _error(400, f"FakeHub: malformed request: {exc!r}")
        with self._lock:
            self.unexpected.append(f"{method} {path}")
        return _error(404, f"FakeHub: no endpoint for {method} {path}")

    # Endpoints: (URL groups, query, body, request headers) -> (status, JSON payload or bytes, headers)

    def _check(self, repo: str, rev: str | None = None) -> tuple | None:
        with self._lock:
            if repo not in self.repos:
                return _error(404, f"Repository {repo} not found", "RepoNotFound")
            pr = PR_REF.fullmatch(rev or "")
            served = self._served.get(repo, {"refs": {}})
            known = rev in self.branches or rev in served["refs"] or rev in served["refs"].values()
            if rev is not None and not known and not (pr and (repo, int(pr[1])) in self._prs):
                return _error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return None

    def _read(self, repo: str, rev: str, headers, *, files: bool) -> tuple[dict[str, Blob] | None, str, tuple | None]:
        """A served repo's snapshot at ``rev``, its commit oid and None; or (None, "", the Hub's error answer).
        ``files``: the request reads file contents (a gated repo's gate applies)."""
        auth = headers.get("Authorization")
        with self._lock:
            served = self._served.get(repo)
            if served is None or (served["private"] and auth not in served["access"]):
                # The Hub does not tell a missing repo from a private one; anonymous requests get 401.
                return None, "", _error(404 if auth else 401, "Repository not found", "RepoNotFound")
            if files and served["gated"] and auth not in served["access"]:
                if auth is None:
                    message = (
                        f"Access to model {repo} is restricted. You must have access to it and be authenticated to "
                        "access it. Please log in."
                    )
                    return None, "", _error(401, message, "GatedRepo")
                message = (
                    f"Access to model {repo} is restricted and you are not in the authorized list. Visit "
                    f"{self.url}/{repo} to ask for access."
                )
                return None, "", _error(403, message, "GatedRepo")
            commit = served["refs"].get(rev, rev if rev in served["refs"].values() else None)
            if commit is None:
                return None, "", _error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return self._snapshots[commit], commit, None

    def _repo_info(self, groups, query, body, headers) -> tuple:
        repo, rev = groups["repo"], groups.get("rev", "main")
        if repo in self._served or repo not in self.repos:
            files, commit, error = self._read(repo, rev, headers, files=False)
            if error:
                return error
            blobs = query.get("blobs", ["false"])[0].lower() == "true"  # files_metadata=True
            siblings = [
                {"rfilename": name, **(blob.sibling_metadata() if blobs else {})} for name, blob in files.items()
            ]
            served = self._served[repo]
            info = {"id": repo, "modelId": repo, "sha": commit, "private": served["private"], "disabled": False}
            info.update(gated="manual" if served["gated"] else False, xetEnabled=False, tags=[], siblings=siblings)
            return 200, {**info, "lastModified": "2024-01-01T00:00:00.000Z"}, {}
        if error := self._check(repo, rev):
            return error
        with self._lock:
            info = {"id": repo, "sha": self._heads.get((repo, rev), "0" * 40), "xetEnabled": False}
            return 200, {**info, "private": bool(self.repos[repo]["private"])}, {}

    def _tree(self, groups, query, body, headers) -> tuple:
        files, commit, error = self._read(groups["repo"], groups["rev"], headers, files=False)
        if error:
            return error
        base = groups.get("path", "").strip("/")
        prefix = f"{base}/" if base else ""
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries: dict[str, dict] = {}
        for name, blob in files.items():
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            folders = range(1, len(parts)) if recursive else [1] if len(parts) > 1 else []
            for depth in folders:
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0}
            if recursive or len(parts) == 1:
                entries[name] = blob.tree_entry()
        if base and not entries:
            return _error(404, f"{base} does not exist on {groups['rev']!r}", "EntryNotFound")
        listing = [{**entries[path], "path": path} for path in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0])
        page, more = listing[start : start + self.tree_page_size], start + self.tree_page_size < len(listing)
        links = {}
        if more:  # the Hub's cursor is opaque; this one is an offset
            params = {k: v[0] for k, v in query.items()} | {"cursor": str(start + self.tree_page_size)}
            path = f"/api/models/{quote(groups['repo'])}/tree/{quote(groups['rev'], safe='')}"
            links["Link"] = f'<{self.url}{path}{"/" + quote(base) if base else ""}?{urlencode(params)}>; rel="next"'
        return 200, page, links

    def _resolve(self, groups, query, body, headers) -> tuple:
        files, commit, error = self._read(groups["repo"], groups["rev"], headers, files=True)
        if error:
            return error
        blob = files.get(groups["path"])
        if blob is None:
            message = f"Entry not found: {groups['path']} does not exist at {commit}"
            return _error(404, message, "EntryNotFound", {"X-Repo-Commit": commit})
        if blob.lfs:  # like the Hub: a redirect to the CDN, whose answer holds no Hub header
            location = f"{self.cdn_url}{CDN}{blob.sha256}?expires=900"
            redirect = {"Location": location, "X-Repo-Commit": commit, "ETag": f'"{blob.sha256}"'}
            redirect.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": len(blob.data)})
            return 302, f"Found. Redirecting to {location}".encode(), redirect
        status, data, range_headers = _ranged(blob.data, headers.get("Range"))
        return status, data, {"X-Repo-Commit": commit, "ETag": f'"{blob.oid}"', **range_headers}

    def _cdn(self, groups, query, body, headers) -> tuple:
        if headers.get("Authorization"):  # as S3 answers a signed URL that also carries a token
            return _error(400, "FakeHub: the CDN got an Authorization header with a signed URL")
        with self._lock:
            found = [b.data for s in self._snapshots.values() for b in s.values() if b.sha256 == groups["sha256"]]
        if not found:
            return _error(404, "FakeHub: no such blob on the CDN")
        status, data, range_headers = _ranged(found[0], headers.get("Range"))
        return status, data, {"ETag": f'"{groups["sha256"]}"', **range_headers}

    def _create_repo(self, groups, query, body, headers) -> tuple:
        payload = json.loads(body)
        repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        # 2.x sends "visibility", 1.x "private"; neither when the caller passes private=None.
        private = payload.get("private", {"private": True, "public": False}.get(payload.get("visibility")))
        with self._lock:
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}, {}
            self.repos[repo] = {"private": private, "type": payload.get("type") or "model"}
        return 200, {"url": f"{self.url}/{repo}", "name": repo}, {}

    def _preupload(self, groups, query, body, headers) -> tuple:
        if error := self._check(groups["repo"], groups["rev"]):
            return error
        files = []
        for file in json.loads(body)["files"]:
            lfs = self.lfs and (file["size"] >= LFS_MIN_SIZE or b"\0" in base64.b64decode(file["sample"]))
            files.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": files}, {}

    def _lfs_batch(self, groups, query, body, headers) -> tuple:
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

    def _lfs_put(self, groups, query, body, headers) -> tuple:
        if hashlib.sha256(body).hexdigest() != groups["oid"]:
            return _error(400, "FakeHub: the uploaded content does not match its sha256")
        with self._lock:
            self._lfs_objects[groups["oid"]] = body
        return 200, {}, {}

    def _commit(self, groups, query, body, headers) -> tuple:
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

    def _open_pr(self, groups, query, body, headers) -> tuple:
        payload = json.loads(body)
        if error := self._check(groups["repo"]):
            return error
        if not payload.get("pullRequest"):
            return _error(400, "FakeHub: only pull requests are supported")
        with self._lock:
            num = self._new_pr(groups["repo"], "main", payload["title"])  # against the default branch
        return 200, {"num": num, "url": f"{self.url}/{groups['repo']}/discussions/{num}", "pullRequest": True}, {}

    def _pr_details(self, groups, query, body, headers) -> tuple:
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

"""qtool's one door to the Hugging Face Hub: list, fetch and read checkpoints, push results, and explain failures.

A *source* is either a local folder (written by ``save_pretrained``) or a Hub repo id (``name`` or ``owner/name``).
Every function here takes either. This is the only qtool module that imports huggingface_hub, and it does so
inside the functions, so ``import qtool.hub`` stays cheap.

Failures of the Hub become a ``QtoolError`` with a one-line message and a one-line hint (:func:`_hub_errors`).
The token is scrubbed from those and from the chained huggingface_hub exceptions, so a traceback printed with
``QTOOL_DEBUG=1`` never shows it. Under ``HF_HUB_OFFLINE=1`` (or without a network) the cache still answers: the
downloads come from it, and so do file listings and safetensors headers of repos downloaded before.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import sys
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qtool.errors import QtoolError

__all__ = [
    "is_local",
    "list_files",
    "download",
    "read_json",
    "safetensors_headers",
    "upload_folder",
    "endpoint",
    "card_metadata",
    "render_card",
]

# One part of a repo id, by the Hub's rules: word characters, "-" and ".", starting and ending with a word
# character, at most 96 characters; "--" and ".." are refused separately.
_PART = r"\w(?:[\w.-]{0,94}\w)?"
_REPO_ID = re.compile(rf"(?:{_PART}/)?{_PART}", re.ASCII)
_LOGIN = "pass --token or set HF_TOKEN (or run `hf auth login`)"
_UNREACHABLE_HINT = "check the network connection, or unset HF_HUB_OFFLINE, or pass a local folder"
# Shapes of Hub tokens and of the header that carries them, redacted even when qtool was not told the token.
_TOKEN_PATTERNS = (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), re.compile(r"(?i)(bearer\s+)[^\s'\",}]+"))
_REDACTED = "<token>"


# Sources


def is_local(source: str) -> bool:
    """Whether ``source`` names something on this machine rather than a Hub repo.

    True for an existing directory, and for an existing file named by a path-looking string (one that starts with
    ``.``, ``/`` or ``~``, or contains a path separator). Everything else is taken for a repo id; a path-looking
    string that does not exist then fails in the other functions with "no such folder", not with a Hub lookup.
    """
    if not source.strip():
        return False
    path = Path(source).expanduser()
    return path.is_dir() or (_looks_like_path(source) and path.exists())


def _looks_like_path(source: str) -> bool:
    separators = [s for s in (os.sep, os.altsep) if s]
    return source.startswith((".", "/", "~")) or any(s in source for s in separators)


def _is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text


def _resolve(source: str) -> Path | str:
    """A local folder as an absolute ``Path``, or a repo id as ``str``; a ``QtoolError`` for anything else."""
    source = os.fspath(source)
    if not source.strip():
        raise QtoolError("the source is empty", hint="pass a folder, or a repo id such as black-forest-labs/FLUX.1-dev")
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if _looks_like_path(source) and path.exists():
        raise QtoolError(
            f"{source} is a file, not a folder",
            hint="pass the folder that holds the checkpoint (with its config.json or model_index.json)",
        )
    if _is_repo_id(source):
        return source
    if _looks_like_path(source):
        raise QtoolError(f"no such folder: {source}", hint="check the path; a Hub repo id is `name` or `owner/name`")
    raise QtoolError(
        f"{source!r} is neither a local folder nor a Hugging Face repo id",
        hint="pass a folder, or a repo id such as black-forest-labs/FLUX.1-dev",
    )


# Public API


def list_files(source: str, *, revision: str | None = None, token: str | None = None) -> list[str]:
    """The file paths of a repo at ``revision``, or of a local folder, relative and with "/", sorted.

    Offline, a repo's listing comes from the cache when the repo was downloaded at that revision before. For a
    local folder, ``.git/`` and ``.cache/huggingface/`` are left out and ``revision`` and ``token`` are unused.

    The repo's info comes first: one request, which fails at once without a network (huggingface_hub retries a
    tree listing 5 times over about 25 s, with a warning on stderr each time); the tree is then listed at the
    commit that the info names.
    """
    resolved = _resolve(source)
    if isinstance(resolved, Path):
        return _local_files(resolved)
    import huggingface_hub as hf

    with _hub_errors(resolved, token=token, revision=revision):
        try:
            commit = hf.repo_info(repo_id=resolved, revision=revision, token=token).sha
            files = hf.list_repo_files(repo_id=resolved, revision=commit or revision, token=token)
        except _connection_errors():
            files = _cached_listing(resolved, revision)
            if files is None:
                raise
    return sorted(files)


def download(
    source: str,
    *,
    patterns: list[str],
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> Path:
    """The local folder holding ``source``'s files that match ``patterns`` (globs such as ``transformer/*``).

    A local folder is returned as is (absolute). A repo goes through ``snapshot_download``, so the Hub cache,
    resumed downloads, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply, and the snapshot
    folder in the cache is returned. ``progress=False`` hides huggingface_hub's progress bars for this call only.
    """
    resolved = _resolve(source)
    if isinstance(resolved, Path):
        return resolved
    import huggingface_hub as hf

    kwargs: dict[str, Any] = {"repo_id": resolved, "revision": revision, "token": token, "allow_patterns": patterns}
    if not progress:
        kwargs["tqdm_class"] = _quiet_tqdm()
    with _hub_errors(resolved, token=token, revision=revision):
        folder = hf.snapshot_download(**kwargs)
    return Path(folder)


def read_json(source: str, filename: str, *, revision: str | None = None, token: str | None = None) -> dict:
    """A small JSON object (``config.json``, ``model_index.json``...) from a repo (one file fetched) or a folder."""
    resolved = _resolve(source)
    if isinstance(resolved, Path):
        path = resolved / filename
        if not path.is_file():
            raise QtoolError(f"{filename} not found in {resolved}", hint="check the folder and the file name")
        where = str(resolved)
    else:
        import huggingface_hub as hf

        with _hub_errors(resolved, token=token, revision=revision, filename=filename):
            path = Path(hf.hf_hub_download(repo_id=resolved, filename=filename, revision=revision, token=token))
        where = _repo_url(resolved)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QtoolError(f"{filename} in {where} is not valid JSON ({exc})", hint="the file may be damaged") from exc
    if not isinstance(data, dict):
        raise QtoolError(f"{filename} in {where} holds a JSON {type(data).__name__}, not an object")
    return data


def safetensors_headers(
    source: str, filenames: list[str], *, revision: str | None = None, token: str | None = None
) -> dict[str, dict]:
    """Each file's tensors as ``{filename: {tensor_name: {"dtype": "BF16", "shape": [3072, 64]}}}``.

    From a repo, only the headers are fetched (HTTP range requests), never the tensor data; offline, files that
    are in the cache are read there. From a local folder, the headers are read from the files.
    """
    resolved = _resolve(source)
    if isinstance(resolved, Path):
        return {name: _read_local_header(resolved / name, name) for name in filenames}

    def one(filename: str) -> dict:
        return _remote_header(resolved, filename, revision=revision, token=token)

    if len(filenames) <= 1:
        headers = [one(name) for name in filenames]
    else:
        with ThreadPoolExecutor(max_workers=min(8, len(filenames)), thread_name_prefix="qtool-headers") as pool:
            headers = list(pool.map(one, filenames))
    return dict(zip(filenames, headers, strict=True))


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> tuple[str, str | None]:
    """Push every file of ``folder`` to the model repo ``repo_id`` in exactly one commit, creating the repo if
    needed; ``(commit URL, pull request URL or None)``.

    One ``create_commit`` with every file, so the repo never shows a config.json without its weights (``upload_folder``
    may split large folders into several commits). Large files go through huggingface_hub's LFS/Xet pre-upload,
    which skips what the Hub already holds: a push that failed part-way resumes where it stopped when run again.
    ``private=False`` leaves the visibility of a new repo to the Hub; an existing repo keeps its own. ``revision``
    is the branch to commit to (it must exist); with ``create_pr`` the commit opens a pull request instead.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise QtoolError(f"no such folder: {folder}", hint="pass the folder that qtool wrote")
    check_repo_id(repo_id)
    import huggingface_hub as hf

    files = _local_files(folder)
    with _hub_errors(repo_id, token=token, revision=revision):
        repo = hf.create_repo(repo_id=repo_id, private=private or None, exist_ok=True, token=token)
        operations = [hf.CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        try:
            commit = hf.create_commit(
                repo_id=repo.repo_id,
                operations=operations,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or "Upload checkpoint quantized with qtool",
                token=token,
            )
        except ValueError as exc:  # the client's own argument checks (e.g. create_pr against another branch)
            raise QtoolError(f"the push was refused before uploading: {_one_line(str(exc))}") from None
    return commit.commit_url, commit.pr_url


def check_repo_id(repo_id: str) -> None:
    """Refuse what cannot name a repo to push to (``owner/name``, or ``name`` in the token's namespace)."""
    if not _is_repo_id(repo_id):
        raise QtoolError(f"{repo_id!r} is not a Hugging Face repo id", hint="use `owner/name`, e.g. me/FLUX.1-dev-nf4")


def endpoint() -> str:
    """The Hub's base URL (HF_ENDPOINT, or https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def card_metadata(path: Path) -> dict:
    """The YAML metadata of a model card (README.md), or {} when there is none or it does not parse."""
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(path) or {}
    except Exception:  # a damaged card must not stop a conversion; its metadata is only carried over
        return {}


def render_card(metadata: dict, body: str) -> str:
    """A model card: ``metadata`` as the YAML block huggingface_hub writes, then the markdown ``body``."""
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n\n{body.strip()}\n"


# Local folders


def _local_files(folder: Path) -> list[str]:
    files = []
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop
            dirs.clear()
            continue
        seen.add(real)
        relative = Path(root).relative_to(folder)
        if relative == Path("."):
            dirs[:] = [d for d in dirs if d != ".git"]
        if relative == Path(".cache"):
            dirs[:] = [d for d in dirs if d != "huggingface"]
        files.extend((relative / name).as_posix() for name in names)
    return sorted(files)


def _read_local_header(path: Path, name: str) -> dict:
    """A local file's header, in the shape the Hub's metadata API gives; qtool.io parses and checks it."""
    from qtool.io.reader import safetensors_header

    if not path.is_file():
        raise QtoolError(f"{name} not found in {path.parent}", hint="check the folder and the file name")
    try:
        infos, _ = safetensors_header(path)
    except QtoolError as exc:
        raise QtoolError(exc.message, hint="the file may be damaged") from exc
    return {key: {"dtype": info.dtype, "shape": list(info.shape)} for key, info in infos.items()}


# Repos


def _repo_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo_id}"


def _remote_header(repo_id: str, filename: str, *, revision: str | None, token: str | None) -> dict:
    import huggingface_hub as hf

    with _hub_errors(repo_id, token=token, revision=revision, filename=filename):
        try:
            meta = hf.parse_safetensors_file_metadata(
                repo_id=repo_id, filename=filename, revision=revision, token=token
            )
        except _connection_errors():
            cached = hf.try_to_load_from_cache(repo_id, filename, revision=revision)
            if not isinstance(cached, str):
                raise
            return _read_local_header(Path(cached), filename)
    return {name: {"dtype": info.dtype, "shape": list(info.shape)} for name, info in meta.tensors.items()}


def _cached_listing(repo_id: str, revision: str | None) -> list[str] | None:
    """The file list that ``snapshot_download`` cached for this revision, or None."""
    import huggingface_hub as hf
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in hf.get_cached_repo_tree(repo_id, revision=revision)]
    except CachedRepoTreeNotFoundError:
        return None


@functools.cache
def _quiet_tqdm() -> type:
    """huggingface_hub's tqdm, always disabled: a ``tqdm_class`` that hides the bars of one call only.

    (``disable_progress_bars()`` would hide them for every thread of the process until re-enabled.)
    """
    from huggingface_hub.utils import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached: ``OfflineModeIsEnabled`` (a
    ``ConnectionError``) under ``HF_HUB_OFFLINE=1``, and its HTTP client's transport errors (httpx2 in 2.x,
    httpx in 1.x). Only clients already imported can have raised anything."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "TransportError", None), type):
            found.append(module.TransportError)
    requests = sys.modules.get("requests")
    if requests is not None:
        found += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    return tuple(found)


# Errors


@contextmanager
def _hub_errors(
    repo_id: str, *, token: Any = None, revision: str | None = None, filename: str | None = None
) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into ``QtoolError``; scrub tokens from every exception that passes."""
    try:
        yield
    except QtoolError:
        raise
    except Exception as exc:
        secrets = _secrets(token)
        clean = _scrub(exc, secrets)
        mapped = _map_error(exc, repo_id, revision, filename)
        if mapped is not None:
            error = QtoolError(_redact(mapped.message, secrets), _redact(mapped.hint or "", secrets) or None)
            if clean:
                raise error from exc
            raise error from None
        if clean:
            raise
        raise RuntimeError(f"{type(exc).__name__} (details withheld: they held a token)") from None


def _map_error(exc: Exception, repo_id: str, revision: str | None, filename: str | None) -> QtoolError | None:
    from huggingface_hub import constants, errors

    url = _repo_url(repo_id)
    rev = revision or "main"
    if isinstance(exc, errors.GatedRepoError):
        if _status(exc) == 401:  # the Hub's answer to a request without a token
            return QtoolError(
                f"{url} is a gated repository and no token was sent",
                hint=f"accept the license at {url}, then {_LOGIN}",
            )
        return QtoolError(
            f"{url} is a gated repository and the token has no access to it",
            hint=f"accept the license at {url} with the token's account (approval may be pending), or pass "
            "--token with a token that has access",
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        # The Hub answers 401 without a token, 404 with one that cannot see the repo.
        private = "use a token that can read it" if _status(exc) == 404 else _LOGIN
        return QtoolError(
            f"repository {repo_id} not found, or private: {url}",
            hint=f"check the repo id; for a private repo {private}",
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return QtoolError(
            f"revision {rev!r} not found in {url}",
            hint=f"check --revision: a branch, tag or commit hash of the repo (see {url}/tree/main)",
        )
    if isinstance(exc, errors.LocalEntryNotFoundError) or isinstance(exc, _connection_errors()):
        offline = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
        if isinstance(exc, errors.IncompleteSnapshotError):
            cache = ", and its copy in the local cache is incomplete"
        elif isinstance(exc, errors.LocalEntryNotFoundError):
            cache = ", and the files are not in the local cache"
        else:
            cache = ""
        return QtoolError(f"cannot reach the Hugging Face Hub for {url}{offline}{cache}", hint=_UNREACHABLE_HINT)
    if isinstance(exc, errors.EntryNotFoundError):
        what = f"file {filename!r}" if filename else "a requested file"
        return QtoolError(
            f"{what} not found in {url} at revision {rev!r}",
            hint=f"check the file name against the repo's files ({url}/tree/{rev})",
        )
    if isinstance(exc, errors.LocalTokenNotFoundError):
        return QtoolError(f"no Hugging Face token found for {url}", hint=_LOGIN)
    if isinstance(exc, errors.HfHubHTTPError):
        return _map_http_error(exc, url)
    if isinstance(exc, errors.HFValidationError):
        return QtoolError(
            f"invalid repo id or revision for the Hub: {_one_line(str(exc))}",
            hint="a repo id is `name` or `owner/name`",
        )
    if isinstance(exc, errors.SafetensorsParsingError):
        return QtoolError(
            f"cannot parse the safetensors header of {filename or 'a file'} in {url}",
            hint="the file may be damaged or not a safetensors file",
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return QtoolError(
            f"no space left on the device while fetching {url}",
            hint="free some space, or set HF_HOME (or HF_HUB_CACHE) to a folder on a larger disk",
        )
    if type(exc).__module__.split(".")[0] == "huggingface_hub":
        return QtoolError(
            f"the Hugging Face Hub request for {url} failed: {type(exc).__name__}: {_one_line(str(exc))}",
            hint="try again; set HF_DEBUG=1 and QTOOL_DEBUG=1 for details",
        )
    return None


def _status(exc: Exception) -> int | None:
    """The HTTP status of a huggingface_hub error's response, if it has one."""
    return getattr(getattr(exc, "response", None), "status_code", None)


def _map_http_error(exc: Any, url: str) -> QtoolError:
    status = _status(exc)
    detail = f": {_one_line(exc.server_message)}" if getattr(exc, "server_message", None) else ""
    if status == 401:
        return QtoolError(
            f"the Hub rejected the token for {url} (HTTP 401: invalid or expired)",
            hint=f"{_LOGIN}, with a valid token from https://huggingface.co/settings/tokens",
        )
    if status == 403:
        return QtoolError(
            f"the token may not access {url} (HTTP 403){detail}",
            hint="use a token with access to this repo (write access, to push): https://huggingface.co/settings/tokens",
        )
    if status == 429:
        return QtoolError(f"the Hub is rate-limiting requests for {url} (HTTP 429)", hint=f"wait a minute; {_LOGIN}")
    if status is not None and status >= 500:
        return QtoolError(
            f"the Hugging Face Hub failed on {url} (HTTP {status})",
            hint="the Hub may be busy or down: try again later, or pass a local folder",
        )
    return QtoolError(f"the Hub refused the request for {url} (HTTP {status}){detail}", hint="check the arguments")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _secrets(token: Any) -> list[str]:
    """Tokens that must not be shown: the one passed, and those in the environment and the token file."""
    found = [token] if isinstance(token, str) else []
    found += [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import constants

        found.append(Path(constants.HF_TOKEN_PATH).read_text().strip())
    except Exception:
        pass
    # Short strings would redact ordinary words; real tokens are long.
    return sorted({s.strip() for s in found if isinstance(s, str) and len(s.strip()) >= 8}, key=len, reverse=True)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    text = _TOKEN_PATTERNS[0].sub(_REDACTED, text)
    return _TOKEN_PATTERNS[1].sub(lambda m: m.group(1) + _REDACTED, text)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        pending += [e for e in getattr(current, "exceptions", ()) if isinstance(e, BaseException)]


def _scrub(exc: BaseException, secrets: list[str]) -> bool:
    """Redact tokens from the messages of ``exc`` and its chain, in place; whether its traceback is now clean."""
    for current in _chain(exc):
        current.args = tuple(_redact(a, secrets) if isinstance(a, str) else a for a in current.args)
        notes = getattr(current, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [_redact(n, secrets) if isinstance(n, str) else n for n in notes]
        if isinstance(current, OSError):
            for attr in ("strerror", "filename", "filename2"):
                value = getattr(current, attr, None)
                if isinstance(value, str):
                    setattr(current, attr, _redact(value, secrets))
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        return False
    # Not the "Bearer" pattern: huggingface_hub's source lines that build the header may show in the traceback.
    return not any(s in text for s in secrets) and not _TOKEN_PATTERNS[0].search(text)

"""qtool.hub against mocked huggingface_hub functions (patched on the huggingface_hub module, where qtool.hub
looks them up at call time), real local folders, and a hand-made offline cache. No test touches the network."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import traceback
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, ModelInfo, RepoFile, RepoUrl, constants
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)
from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo
from safetensors.torch import save_file

from qtool import hub
from qtool.errors import QtoolError

REPO = "acme/tiny-flux"
URL = f"{constants.ENDPOINT}/{REPO}"
TOKEN = "hf_QtoolFakeToken0123456789abcdefXYZ"

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx; qtool.hub maps the errors of either
    import httpx2 as http_client
except ImportError:
    import httpx as http_client


def patch_hf(name: str, **kwargs) -> mock._patch:
    return mock.patch.object(huggingface_hub, name, **kwargs)


def response(status: int, url: str = f"{URL}/resolve/main/config.json") -> http_client.Response:
    return http_client.Response(status, request=http_client.Request("GET", url))


def http_error(cls: type, status: int, message: str = "Client Error") -> Exception:
    return cls(f"{status} {message}", response=response(status))


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def assert_one_line(err: QtoolError) -> None:
    assert err.message and "\n" not in err.message
    assert err.hint and "\n" not in err.hint


# Sources


def test_is_local(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert hub.is_local(str(tmp_path / "ckpt"))
    assert hub.is_local("ckpt")  # an existing folder, even with a repo-id-like name
    assert hub.is_local("~/ckpt")
    assert hub.is_local("./model.safetensors")
    assert not hub.is_local("model.safetensors")  # a bare name counts only as a folder
    assert not hub.is_local("./missing")
    assert not hub.is_local(REPO)
    assert not hub.is_local("FLUX.1-dev")
    assert not hub.is_local("")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("./missing", "no such folder: ./missing"),
        ("~/missing-qtool-folder", "no such folder"),
        ("/nonexistent/qtool/ckpt", "no such folder"),
        ("acme/tiny/flux", "no such folder"),
        ("acme/../flux", "no such folder"),
        ("not a repo", "neither a local folder nor a Hugging Face repo id"),
        ("acme--flux", "neither"),
        ("", "empty"),
    ],
)
def test_bad_sources_fail_before_any_hub_call(source, expected):
    names = ("list_repo_files", "snapshot_download", "hf_hub_download", "parse_safetensors_file_metadata")
    with ExitStack() as stack:
        mocks = [stack.enter_context(patch_hf(name)) for name in names]
        for call in (
            lambda: hub.list_files(source),
            lambda: hub.download(source, patterns=["*"]),
            lambda: hub.read_json(source, "config.json"),
            lambda: hub.safetensors_headers(source, ["model.safetensors"]),
        ):
            with pytest.raises(QtoolError) as info:
                call()
            assert expected in info.value.message
            assert_one_line(info.value)
    for m in mocks:
        m.assert_not_called()


def test_a_file_is_not_a_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(QtoolError, match="is a file, not a folder"):
        hub.list_files(str(path))


# list_files


def test_list_files_local(tmp_path):
    for name in ("model_index.json", "transformer/config.json", "transformer/b.safetensors", "vae/x/y.bin"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    for name in (".git/HEAD", ".cache/huggingface/download/x.metadata"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "vae" / "loop").symlink_to(tmp_path / "vae")
    assert hub.list_files(str(tmp_path)) == [
        "model_index.json",
        "transformer/b.safetensors",
        "transformer/config.json",
        "vae/x/y.bin",
    ]


COMMIT = "c" * 40


def test_list_files_repo():
    """The repo's info first (one request that fails fast), then the tree at the commit it names."""
    with (
        patch_hf("repo_info", return_value=ModelInfo(id=REPO, sha=COMMIT)) as repo_info,
        patch_hf("list_repo_files", return_value=["b.json", "a/c.safetensors"]) as list_repo_files,
    ):
        assert hub.list_files(REPO, revision="v1", token=TOKEN) == ["a/c.safetensors", "b.json"]
    repo_info.assert_called_once_with(repo_id=REPO, revision="v1", token=TOKEN)
    list_repo_files.assert_called_once_with(repo_id=REPO, revision=COMMIT, token=TOKEN)


def test_list_files_offline_uses_the_cached_listing():
    cached = [RepoFile(path="model_index.json", size=2, oid="0" * 40), RepoFile(path="vae/a.json", size=2, oid="1")]
    with (
        patch_hf("repo_info", side_effect=OfflineModeIsEnabled("offline")),
        patch_hf("get_cached_repo_tree", return_value=cached) as tree,
    ):
        assert hub.list_files(REPO, revision="main") == ["model_index.json", "vae/a.json"]
    tree.assert_called_once_with(REPO, revision="main")


def test_list_files_offline_without_a_cached_listing():
    with (
        patch_hf("repo_info", side_effect=http_client.ConnectError("no route")),
        patch_hf("list_repo_files") as list_repo_files,
        patch_hf("get_cached_repo_tree", side_effect=CachedRepoTreeNotFoundError("none")),
        pytest.raises(QtoolError, match="cannot reach the Hugging Face Hub") as info,
    ):
        hub.list_files(REPO)
    assert URL in info.value.message
    assert isinstance(info.value.__cause__, http_client.ConnectError)
    list_repo_files.assert_not_called()  # huggingface_hub retries it for ~25 s without a network


# download


def test_download_local_folder_is_returned_resolved(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    with patch_hf("snapshot_download") as snapshot_download:
        assert hub.download("./ckpt", patterns=["*.json"]) == (tmp_path / "ckpt").resolve()
    snapshot_download.assert_not_called()


def test_download_repo(tmp_path):
    with patch_hf("snapshot_download", return_value=str(tmp_path)) as snapshot_download:
        folder = hub.download(REPO, patterns=["model_index.json", "transformer/*"], revision="abc", token=TOKEN)
    assert folder == tmp_path
    snapshot_download.assert_called_once_with(
        repo_id=REPO, revision="abc", token=TOKEN, allow_patterns=["model_index.json", "transformer/*"]
    )


def test_download_without_progress_bars(tmp_path):
    with patch_hf("snapshot_download", return_value=str(tmp_path)) as snapshot_download:
        hub.download(REPO, patterns=["*.json"], progress=False)
    kwargs = snapshot_download.call_args.kwargs
    tqdm_class = kwargs.pop("tqdm_class")
    assert kwargs == {"repo_id": REPO, "revision": None, "token": None, "allow_patterns": ["*.json"]}
    assert issubclass(tqdm_class, huggingface_hub.utils.tqdm)
    # huggingface_hub creates its bars with disable=None (auto) and a group name; ours stay off regardless.
    with tqdm_class(disable=None, name="huggingface_hub.snapshot_download", total=3) as bar:
        bar.update(1)
        assert bar.disable


# read_json


def test_read_json_local(tmp_path):
    write_json(tmp_path / "transformer" / "config.json", {"_class_name": "FluxTransformer2DModel"})
    assert hub.read_json(str(tmp_path), "transformer/config.json") == {"_class_name": "FluxTransformer2DModel"}
    with pytest.raises(QtoolError, match="model_index.json not found in"):
        hub.read_json(str(tmp_path), "model_index.json")


def test_read_json_repo(tmp_path):
    path = write_json(tmp_path / "model_index.json", {"transformer": ["diffusers", "FluxTransformer2DModel"]})
    with patch_hf("hf_hub_download", return_value=str(path)) as hf_hub_download:
        data = hub.read_json(REPO, "model_index.json", revision="v2", token=TOKEN)
    assert data == {"transformer": ["diffusers", "FluxTransformer2DModel"]}
    hf_hub_download.assert_called_once_with(repo_id=REPO, filename="model_index.json", revision="v2", token=TOKEN)


@pytest.mark.parametrize(("text", "expected"), [("{not json", "is not valid JSON"), ("[1, 2]", "JSON list")])
def test_read_json_rejects_what_is_not_an_object(tmp_path, text, expected):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(QtoolError, match=expected):
        hub.read_json(str(tmp_path), "config.json")
    with patch_hf("hf_hub_download", return_value=str(tmp_path / "config.json")):
        with pytest.raises(QtoolError, match=expected) as info:
            hub.read_json(REPO, "config.json")
    assert URL in info.value.message


# safetensors_headers

LOCAL_TENSORS = {
    "blocks.0.weight": torch.zeros(3, 5, dtype=torch.bfloat16),
    "blocks.0.bias": torch.zeros(5, dtype=torch.float16),
    "scale": torch.tensor(1.0),
    "codes": torch.zeros(2, 2, 2, dtype=torch.int8),
}
LOCAL_HEADER = {
    "blocks.0.weight": {"dtype": "BF16", "shape": [3, 5]},
    "blocks.0.bias": {"dtype": "F16", "shape": [5]},
    "scale": {"dtype": "F32", "shape": []},
    "codes": {"dtype": "I8", "shape": [2, 2, 2]},
}


def test_safetensors_headers_local(tmp_path):
    (tmp_path / "transformer").mkdir()
    save_file(LOCAL_TENSORS, str(tmp_path / "transformer" / "a.safetensors"), metadata={"format": "pt"})
    save_file({"x": torch.ones(7)}, str(tmp_path / "b.safetensors"))
    headers = hub.safetensors_headers(str(tmp_path), ["transformer/a.safetensors", "b.safetensors"])
    assert headers == {
        "transformer/a.safetensors": LOCAL_HEADER,
        "b.safetensors": {"x": {"dtype": "F32", "shape": [7]}},
    }


def framed(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b"abc", r"truncated safetensors file \(3 bytes", id="short"),
        pytest.param(struct.pack("<Q", 10**6) + b"{}", r"header length 1000000 is larger than the file", id="length"),
        pytest.param(framed(b"{{{{"), "header is not valid JSON", id="json"),
        pytest.param(framed(b"[]"), "header is not a JSON object", id="list"),
        pytest.param(framed(b'{"w": {"a": 1}}'), "tensor 'w': unknown dtype tag None", id="entry"),
    ],
)
def test_safetensors_headers_local_damaged(tmp_path, content, expected):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(QtoolError, match=expected) as info:
        hub.safetensors_headers(str(tmp_path), ["model.safetensors"])
    assert info.value.message.startswith(f"{tmp_path / 'model.safetensors'}: ")
    assert info.value.hint == "the file may be damaged"


def test_safetensors_headers_local_missing_file(tmp_path):
    with pytest.raises(QtoolError, match="model.safetensors not found"):
        hub.safetensors_headers(str(tmp_path), ["model.safetensors"])


def file_metadata(**tensors) -> SafetensorsFileMetadata:
    infos = {
        name: TensorInfo(dtype=dtype, shape=shape, data_offsets=(0, 0)) for name, (dtype, shape) in tensors.items()
    }
    return SafetensorsFileMetadata(metadata={"format": "pt"}, tensors=infos)


def test_safetensors_headers_repo():
    metas = {
        "transformer/a.safetensors": file_metadata(w=("BF16", [3072, 64]), b=("BF16", [3072])),
        "transformer/b.safetensors": file_metadata(s=("F32", [])),
        "text_encoder_2/c.safetensors": file_metadata(e=("F16", [10, 4])),
    }
    with patch_hf("parse_safetensors_file_metadata", side_effect=lambda **kw: metas[kw["filename"]]) as parse:
        headers = hub.safetensors_headers(REPO, list(metas), revision="v1", token=TOKEN)
    assert list(headers) == list(metas)
    assert headers["transformer/a.safetensors"] == {
        "w": {"dtype": "BF16", "shape": [3072, 64]},
        "b": {"dtype": "BF16", "shape": [3072]},
    }
    assert headers["transformer/b.safetensors"] == {"s": {"dtype": "F32", "shape": []}}
    assert headers["text_encoder_2/c.safetensors"] == {"e": {"dtype": "F16", "shape": [10, 4]}}
    parse.assert_has_calls(
        [mock.call(repo_id=REPO, filename=name, revision="v1", token=TOKEN) for name in metas], any_order=True
    )
    assert parse.call_count == 3


def test_safetensors_headers_repo_offline_reads_the_cache(tmp_path):
    save_file(LOCAL_TENSORS, str(tmp_path / "a.safetensors"))
    with (
        patch_hf("parse_safetensors_file_metadata", side_effect=OfflineModeIsEnabled("offline")),
        patch_hf("try_to_load_from_cache", return_value=str(tmp_path / "a.safetensors")) as cache,
    ):
        assert hub.safetensors_headers(REPO, ["transformer/a.safetensors"], revision="v1") == {
            "transformer/a.safetensors": LOCAL_HEADER
        }
    cache.assert_called_once_with(REPO, "transformer/a.safetensors", revision="v1")
    with (
        patch_hf("parse_safetensors_file_metadata", side_effect=OfflineModeIsEnabled("offline")),
        patch_hf("try_to_load_from_cache", return_value=None),
        pytest.raises(QtoolError, match="cannot reach the Hugging Face Hub"),
    ):
        hub.safetensors_headers(REPO, ["transformer/a.safetensors"])


def test_safetensors_headers_repo_error_names_the_file():
    error = http_error(RemoteEntryNotFoundError, 404, "Entry Not Found")
    with (
        patch_hf("parse_safetensors_file_metadata", side_effect=[file_metadata(w=("F32", [1])), error]),
        pytest.raises(QtoolError, match="file 'b.safetensors' not found") as info,
    ):
        hub.safetensors_headers(REPO, ["a.safetensors", "b.safetensors"])
    assert URL in info.value.message


# upload_folder


def test_upload_folder(tmp_path):
    """One create_commit with every file of the folder (nested ones too), after create_repo."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub" / "b.safetensors").write_bytes(b"xy")
    commit = CommitInfo(commit_url=f"{URL}/commit/{'a' * 40}", commit_message="m", commit_description="", oid="a" * 40)
    with (
        patch_hf("create_repo", return_value=RepoUrl(URL)) as create_repo,
        patch_hf("create_commit", return_value=commit) as create_commit,
    ):
        url, pr = hub.upload_folder(tmp_path, REPO, private=True, revision="dev", create_pr=True, token=TOKEN)
    assert (url, pr) == (f"{URL}/commit/{'a' * 40}", None)
    create_repo.assert_called_once_with(repo_id=REPO, private=True, exist_ok=True, token=TOKEN)
    kwargs = create_commit.call_args.kwargs
    assert [(op.path_in_repo, op.path_or_fileobj) for op in kwargs.pop("operations")] == [
        ("a.json", str(tmp_path / "a.json")),
        ("sub/b.safetensors", str(tmp_path / "sub" / "b.safetensors")),
    ]
    assert kwargs == {
        "repo_id": REPO,
        "revision": "dev",
        "create_pr": True,
        "commit_message": "Upload checkpoint quantized with qtool",
        "token": TOKEN,
    }


def test_upload_folder_defaults_and_namespace(tmp_path):
    """A bare name is created in the user's namespace: the upload goes to the id that create_repo returns."""
    commit = CommitInfo(commit_url=f"{URL}/commit/{'b' * 40}", commit_message="m", commit_description="", oid="b")
    with (
        patch_hf("create_repo", return_value=RepoUrl(URL)) as create_repo,
        patch_hf("create_commit", return_value=commit) as create_commit,
    ):
        hub.upload_folder(tmp_path, "tiny-flux", commit_message="nf4")
    create_repo.assert_called_once_with(repo_id="tiny-flux", private=None, exist_ok=True, token=None)
    assert create_commit.call_args.kwargs["repo_id"] == REPO
    assert create_commit.call_args.kwargs["commit_message"] == "nf4"
    assert create_commit.call_args.kwargs["create_pr"] is False


def test_upload_folder_checks_its_arguments(tmp_path):
    with patch_hf("create_repo") as create_repo:
        with pytest.raises(QtoolError, match="no such folder"):
            hub.upload_folder(tmp_path / "missing", REPO)
        with pytest.raises(QtoolError, match="not a Hugging Face repo id"):
            hub.upload_folder(tmp_path, "a/b/c")
    create_repo.assert_not_called()


def test_upload_folder_forbidden(tmp_path):
    with (
        patch_hf("create_repo", return_value=RepoUrl(URL)),
        patch_hf("create_commit", side_effect=http_error(HfHubHTTPError, 403, "Forbidden")),
        pytest.raises(QtoolError, match=r"HTTP 403") as info,
    ):
        hub.upload_folder(tmp_path, REPO)
    assert URL in info.value.message
    assert "write access" in info.value.hint


# Error mapping: (exception raised by huggingface_hub, words in the message, words in the hint)

ERRORS = {
    "gated-anonymous": (
        lambda: http_error(GatedRepoError, 401, "Cannot access gated repo"),
        [f"{URL} is a gated repository", "no token was sent"],
        [f"accept the license at {URL}", "--token", "HF_TOKEN"],
    ),
    "gated": (
        lambda: http_error(GatedRepoError, 403, "Cannot access gated repo"),
        [f"{URL} is a gated repository", "the token has no access"],
        [f"accept the license at {URL}", "--token"],
    ),
    "not-found": (
        lambda: http_error(RepositoryNotFoundError, 401, "Repository Not Found"),
        [f"repository {REPO} not found, or private", URL],
        ["check the repo id", "--token", "HF_TOKEN", "hf auth login"],
    ),
    "not-found-with-token": (
        lambda: http_error(RepositoryNotFoundError, 404, "Repository Not Found"),
        [f"repository {REPO} not found, or private", URL],
        ["check the repo id", "a token that can read it"],
    ),
    "revision": (
        lambda: http_error(RevisionNotFoundError, 404, "Revision Not Found"),
        ["revision 'v9' not found", URL],
        ["--revision"],
    ),
    "remote-entry": (
        lambda: http_error(RemoteEntryNotFoundError, 404, "Entry Not Found"),
        ["file 'config.json' not found", URL, "'v9'"],
        ["check the file name"],
    ),
    "entry": (lambda: EntryNotFoundError("gone"), ["file 'config.json' not found"], ["file name"]),
    "local-entry": (
        lambda: LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
        ["cannot reach the Hugging Face Hub", URL, "not in the local cache"],
        ["check the network", "HF_HUB_OFFLINE", "local folder"],
    ),
    "incomplete": (
        lambda: IncompleteSnapshotError("partial", snapshot_path="/x"),
        ["cannot reach the Hugging Face Hub", "incomplete"],
        ["HF_HUB_OFFLINE"],
    ),
    "offline": (
        lambda: OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
        ["cannot reach the Hugging Face Hub", URL],
        ["check the network", "HF_HUB_OFFLINE", "local folder"],
    ),
    "connect": (lambda: http_client.ConnectError("[Errno 111] refused"), ["cannot reach", URL], ["check the network"]),
    "timeout": (lambda: http_client.ReadTimeout("timed out"), ["cannot reach", URL], ["check the network"]),
    "401": (
        lambda: http_error(HfHubHTTPError, 401, "Unauthorized"),
        ["rejected the token", "HTTP 401", URL],
        ["--token", "HF_TOKEN"],
    ),
    "403": (lambda: http_error(HfHubHTTPError, 403, "Forbidden"), ["HTTP 403", URL], ["token"]),
    "429": (lambda: http_error(HfHubHTTPError, 429, "Too Many"), ["rate-limiting", URL], ["wait"]),
    "500": (lambda: http_error(HfHubHTTPError, 502, "Bad Gateway"), ["HTTP 502", URL], ["try again later"]),
    "418": (lambda: http_error(HfHubHTTPError, 418, "Teapot"), ["HTTP 418", URL], ["check"]),
    "validation": (lambda: HFValidationError("Repo id must be..."), ["invalid repo id"], ["owner/name"]),
    "no-token": (lambda: LocalTokenNotFoundError("no token"), ["no Hugging Face token found", URL], ["HF_TOKEN"]),
    "parse": (
        lambda: SafetensorsParsingError("bad header"),
        ["cannot parse the safetensors header of config.json", URL],
        ["damaged"],
    ),
    "disk-full": (
        lambda: OSError(errno.ENOSPC, "No space left on device"),
        ["no space left", URL],
        ["HF_HOME"],
    ),
    "other-hub": (lambda: CachedRepoTreeNotFoundError("odd"), ["CachedRepoTreeNotFoundError: odd", URL], ["try again"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_mapping(case, monkeypatch):
    make, in_message, in_hint = ERRORS[case]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    original = make()
    with (
        patch_hf("hf_hub_download", side_effect=original),
        pytest.raises(QtoolError) as info,
    ):
        hub.read_json(REPO, "config.json", revision="v9")
    err = info.value
    assert_one_line(err)
    for words in in_message:
        assert words in err.message, err.message
    for words in in_hint:
        assert words in err.hint, err.hint
    assert err.__cause__ is original


def test_offline_mode_is_named(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with patch_hf("snapshot_download", side_effect=LocalEntryNotFoundError("no")), pytest.raises(QtoolError) as info:
        hub.download(REPO, patterns=["*"])
    assert "(HF_HUB_OFFLINE is set)" in info.value.message


def test_other_exceptions_pass_through():
    original = KeyError("boom")
    with patch_hf("hf_hub_download", side_effect=original), pytest.raises(KeyError) as info:
        hub.read_json(REPO, "config.json")
    assert info.value is original


# The token never shows


def leaky_error(cls_case: str) -> Exception:
    """A huggingface_hub error whose message and cause both quote the token (the worst case)."""
    cause = http_client.ConnectError(f"failed with headers {{'authorization': 'Bearer {TOKEN}'}}")
    if cls_case == "http":
        exc = HfHubHTTPError(f"401 Unauthorized for token {TOKEN}", response=response(401))
    elif cls_case == "connect":
        exc = http_client.ConnectError(f"could not connect as {TOKEN}")
    elif cls_case == "not-found":
        exc = RepositoryNotFoundError(f"Repository Not Found ({TOKEN})", response=response(404))
    else:
        exc = RuntimeError(f"unexpected {TOKEN}")
    exc.__cause__ = cause
    exc.add_note(f"note with {TOKEN}")
    return exc


def raise_leaky(kind: str):
    def side_effect(*args, **kwargs):
        raise leaky_error(kind)  # a new exception per call: the header threads must not share one

    return side_effect


def calls(tmp_path):
    return {
        "list_files": ("repo_info", lambda: hub.list_files(REPO, token=TOKEN)),
        "list_tree": ("list_repo_files", lambda: hub.list_files(REPO, token=TOKEN)),
        "download": ("snapshot_download", lambda: hub.download(REPO, patterns=["*"], token=TOKEN)),
        "read_json": ("hf_hub_download", lambda: hub.read_json(REPO, "a.json", token=TOKEN)),
        "headers": (
            "parse_safetensors_file_metadata",
            lambda: hub.safetensors_headers(REPO, ["a.safetensors", "b.safetensors"], token=TOKEN),
        ),
        "upload": ("create_commit", lambda: hub.upload_folder(tmp_path, REPO, token=TOKEN)),
    }


@pytest.mark.parametrize("function", ["list_files", "list_tree", "download", "read_json", "headers", "upload"])
@pytest.mark.parametrize("kind", ["http", "connect", "not-found", "other"])
def test_token_never_leaks(tmp_path, function, kind):
    target, call = calls(tmp_path)[function]
    with (
        patch_hf("repo_info", return_value=ModelInfo(id=REPO, sha=COMMIT)),
        patch_hf(target, side_effect=raise_leaky(kind)),
        patch_hf("create_repo", return_value=RepoUrl(URL)),
        patch_hf("get_cached_repo_tree", side_effect=CachedRepoTreeNotFoundError("none")),
        patch_hf("try_to_load_from_cache", return_value=None),
        pytest.raises(Exception) as info,
    ):
        call()
    exc = info.value
    text = "".join(traceback.format_exception(exc))
    assert TOKEN not in text
    assert TOKEN not in str(exc)
    assert TOKEN not in getattr(exc, "hint", "")
    assert "<token>" in text  # the chain is kept, redacted
    if kind == "other":
        assert isinstance(exc, RuntimeError)
    else:
        assert isinstance(exc, QtoolError)


def test_token_from_the_environment_is_redacted_too(monkeypatch):
    secret = "oauth-style-secret-without-prefix-42"
    monkeypatch.setenv("HF_TOKEN", secret)
    with patch_hf("hf_hub_download", side_effect=HFValidationError(f"bad {secret}")), pytest.raises(QtoolError) as info:
        hub.read_json(REPO, "a.json")
    assert secret not in "".join(traceback.format_exception(info.value))


# Offline, with a real (hand-made) cache and no mocks


def test_offline_cache_without_mocks(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-flux"
    snapshot = repo / "snapshots" / commit
    write_json(snapshot / "model_index.json", {"_class_name": "FluxPipeline"})
    (snapshot / "transformer").mkdir()
    save_file(LOCAL_TENSORS, str(snapshot / "transformer" / "a.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    folder = hub.download(REPO, patterns=["model_index.json", "transformer/*"], progress=False)
    assert folder.resolve() == snapshot.resolve()
    assert hub.read_json(REPO, "model_index.json") == {"_class_name": "FluxPipeline"}
    assert hub.safetensors_headers(REPO, ["transformer/a.safetensors"]) == {"transformer/a.safetensors": LOCAL_HEADER}
    with pytest.raises(QtoolError, match=r"cannot reach the Hugging Face Hub .*\(HF_HUB_OFFLINE is set\)"):
        hub.list_files(REPO)  # no listing was cached by a real snapshot_download
    with pytest.raises(QtoolError, match="not in the local cache"):
        hub.download("acme/other", patterns=["*"])


# Import cost


def test_import_does_not_load_huggingface_hub():
    code = (
        "import sys, qtool.hub\n"
        "loaded = [m for m in ('huggingface_hub', 'httpx2', 'httpx', 'requests', 'safetensors', 'torch')"
        " if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr

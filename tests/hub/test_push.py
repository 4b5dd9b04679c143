"""`qtool push` and `qtool quantize --push-to` through a real HTTP round trip: the CLI runs in a subprocess with
HF_ENDPOINT pointed at a local stand-in for the Hub (tests/hub/fake_hub.py), so huggingface_hub's own upload code
runs. Checked: exactly one commit holding every file byte for byte plus a valid model card, the token sent but never
printed, and failures as one-line errors with nothing committed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from hub.fake_hub import FakeHub

REPO = "acme/tiny-flux-nf4"
TOKEN = "hf_PushTestToken0123456789abcdefXYZ"


def qtool(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qtool", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def files_of(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def folder(flux_outputs, tmp_path):
    """A copy of the NF4 example output (push writes its card into the folder)."""
    copy = tmp_path / "tiny-flux-nf4"
    shutil.copytree(flux_outputs["nf4"], copy)
    return copy


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_is_one_commit_with_every_file_and_a_card(folder, tmp_path):
    before = files_of(folder)
    with FakeHub(token=TOKEN) as hub:
        done = qtool(
            ["push", str(folder), REPO, "--token", TOKEN, "--private", "--base-model", "black-forest-labs/FLUX.1-dev"],
            hub.env(tmp_path / "hf-home"),
        )
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    [commit] = hub.commits
    assert hub.repos == {REPO: {"private": True, "type": "model"}}
    assert set(hub.authorizations) == {f"Bearer {TOKEN}"} and hub.unexpected == []
    card = (folder / "README.md").read_bytes()
    assert commit["files"] == before | {"README.md": card}
    assert (commit["repo_id"], commit["revision"], commit["create_pr"]) == (REPO, "main", False)
    assert "one commit:" in done.stdout and f"{REPO}/commit/" in done.stdout
    meta = card_metadata(card.decode())
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "diffusers"
    assert meta["tags"] == ["bitsandbytes", "4-bit", "nf4", "qtool"]
    text = card.decode()
    assert f'DiffusionPipeline.from_pretrained("{REPO}"' in text and "| transformer | FluxTransformer2DModel" in text
    assert TOKEN not in text


def test_quantize_push_to_records_the_source_license_and_pushes(tiny_flux, tmp_path):
    """quantize --push-to: the source card's license reaches the pushed card; qtool.json and README.md are in the
    one commit; the source's own card is not."""
    source = tmp_path / "src"
    shutil.copytree(tiny_flux, source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\npipeline_tag: text-to-image\n---\n\n# src\n")
    out = tmp_path / "out"
    with FakeHub() as hub:
        env = hub.env(tmp_path / "hf-home")
        done = qtool(["quantize", str(source), "-o", str(out), "--device", "cpu", "--push-to", REPO, "--json"], env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["push"]["card_written"] and data["push"]["commit_url"].startswith(hub.url)
    [commit] = hub.commits
    assert commit["files"] == files_of(out)
    assert "qtool.json" in commit["files"] and "README.md" in commit["files"]
    meta = card_metadata(commit["files"]["README.md"].decode())
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-to-image"
    assert "base_model" not in meta  # a local source has no repo id to name
    provenance = json.loads(commit["files"]["qtool.json"])
    assert provenance["source"] == str(source) and provenance["method"] == "nf4"


def test_dry_run_is_offline_and_writes_nothing(folder, tmp_path):
    before = files_of(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    done = qtool(["push", str(folder), REPO, "--dry-run", "--json"], env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["dry_run"] and data["card_written"] and data["commit_url"] is None
    assert data["url"] == f"http://127.0.0.1:9/{REPO}"
    listed = {f["path"]: f["bytes"] for f in data["files"]}
    assert set(listed) == set(before) | {"README.md"}
    assert all(listed[p] == len(b) for p, b in before.items()) and listed["README.md"] > 500
    assert files_of(folder) == before


@pytest.mark.parametrize(
    "hub_kwargs,args,message",
    [
        ({}, ["--revision", "dev"], "revision 'dev' not found in"),
        ({"fail_commit": True}, [], "HTTP 500"),
        ({"token": "hf_SomeOtherToken0123456789abcdef"}, [], "rejected the token"),
    ],
    ids=["revision-not-found", "server-error", "bad-token"],
)
def test_failures_are_one_line_and_commit_nothing(folder, tmp_path, hub_kwargs, args, message):
    with FakeHub(**hub_kwargs) as hub:
        done = qtool(["push", str(folder), REPO, "--token", TOKEN, *args], hub.env(tmp_path / "hf-home"))
    assert done.returncode == 1
    assert message in done.stderr and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert hub.commits == []


def test_create_pr(folder, tmp_path):
    with FakeHub() as hub:
        done = qtool(["push", str(folder), REPO, "--create-pr", "--commit-message", "nf4 weights"],
                     hub.env(tmp_path / "hf-home"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    [commit] = hub.commits
    assert commit["create_pr"] and commit["summary"] == "nf4 weights"
    assert "opened a pull request: " in done.stdout and "/discussions/" in done.stdout


def test_push_refuses_a_plain_folder_and_bad_repo_ids(tiny_flux, folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plain = qtool(["push", str(tiny_flux), REPO, "--dry-run"], env)
    assert plain.returncode == 1 and "is not quantized" in plain.stderr
    bad = qtool(["push", str(folder), "a/b/c", "--dry-run"], env)
    assert bad.returncode == 1 and "not a Hugging Face repo id" in bad.stderr
    early = qtool(["quantize", str(tiny_flux), "--push-to", "a/b/c", "--device", "cpu"], env)
    assert early.returncode == 1 and "not a Hugging Face repo id" in early.stderr

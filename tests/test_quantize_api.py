"""qtool.api.quantize_checkpoint's contract on the tiny FLUX-shaped pipeline: the output appears complete or not at
all, refusals come before any work, dry runs predict what a run writes, and the Hub path (qtool.hub faked by
conftest.FakeHub) fetches only what it needs and writes what a local run writes. The codecs and bitsandbytes
compatibility are tested elsewhere (tests/reference, tests/e2e)."""

from __future__ import annotations

import errno
import fnmatch
import importlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from qtool import api
from qtool.errors import QtoolError
from qtool.plan import plan_folder
from qtool.spec import QuantSpec

REPO = "acme/tiny-flux"
REVISION = "v1.0"
TOKEN = "hf_QtoolApiTestToken0123456789abcdefXYZ"
# tiny_flux's components in model_index.json order, and the two quantized by default.
COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
QUANTIZED = ("transformer", "text_encoder_2")
LAYERS = {"transformer": 50, "text_encoder_2": 12}
# Root files of a real FLUX.1-dev repo that are not part of the diffusers layout.
ROOT_EXTRAS = ("flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg")
# Of those, what a run never downloads (it reads the card, README.md, for the license it records).
NEVER_FETCHED = set(ROOT_EXTRAS) - {"README.md"}


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def state(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: kind, size, mtime and inode, so that any write, removal or rename shows."""
    out = {}
    for path in folder.rglob("*"):
        st = path.lstat()
        out[path.relative_to(folder).as_posix()] = (path.is_symlink(), path.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def resolve(target: str):
    """The object a dotted name such as ``qtool.io.writer.ShardedWriter.add_group`` names."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(target)


def fail_on_call(monkeypatch, target: str, n: int, exc: BaseException) -> dict:
    """Make the dotted ``target`` raise ``exc`` at its n-th call (earlier calls work); returns the call counter."""
    original = resolve(target)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(target, wrapper)
    return calls


@pytest.fixture
def model_copy(tiny_flux, tmp_path) -> Path:
    """A private single-model folder (tiny_flux's T5 encoder, config.json + shards) inside tmp_path."""
    return Path(shutil.copytree(tiny_flux / "text_encoder_2", tmp_path / "t5"))


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if quantize_checkpoint reads a tensor or starts writing the output."""

    def forbidden(*args, **kwargs):
        raise AssertionError("quantize_checkpoint started working before it refused")

    monkeypatch.setattr("qtool.api._write", forbidden)
    monkeypatch.setattr("qtool.io.reader.TensorReader.read", forbidden)


def refused(where: Path, source, **kwargs) -> QtoolError:
    """Run quantize_checkpoint expecting a QtoolError that leaves ``where`` exactly as it was; return the error."""
    before = state(where)
    with pytest.raises(QtoolError) as info:
        api.quantize_checkpoint(source, **{"device": "cpu", **kwargs})
    assert state(where) == before
    assert info.value.message and "\n" not in info.value.message
    return info.value


# Atomic output


# (what fails, at which call, with what, what quantize_checkpoint then raises): the 55th of the 62 quantized layers
# (the transformer is complete by then), the 60th tensor group written, the 4th of the 6 entries copied as they are.
FAILURES = {
    "quantize-error": ("qtool.quantize.quantize_pending", 55, RuntimeError("injected"), RuntimeError),
    "ctrl-c": ("qtool.quantize.quantize_pending", 55, KeyboardInterrupt(), KeyboardInterrupt),
    "disk-full": ("qtool.io.writer.ShardedWriter.add_group", 60, OSError(errno.ENOSPC, "No space left"), QtoolError),
    "copy-error": ("qtool.api._copy_entry", 4, OSError(errno.EIO, "Input/output error"), OSError),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failure_midway_leaves_no_trace(tiny_flux, tmp_path, monkeypatch, failure, existing):
    """A failure or Ctrl-C midway leaves no output, no temporary folder, and any old output as it was."""
    target, n, exc, expected = FAILURES[failure]
    out = tmp_path / "tiny-flux-nf4"
    if existing:
        (out / "transformer").mkdir(parents=True)
        (out / "transformer" / "config.json").write_text("{}")
        (out / "old.txt").write_text("the previous run")
    before = tree(tmp_path)
    calls = fail_on_call(monkeypatch, target, n, exc)
    with pytest.raises(expected):
        api.quantize_checkpoint(tiny_flux, output=out, device="cpu", overwrite=existing)
    assert calls["n"] == n, "the failure was not reached"
    assert sorted(os.listdir(tmp_path)) == (["tiny-flux-nf4"] if existing else [])
    assert tree(tmp_path) == before


def test_an_existing_output_is_refused_and_left_untouched(tiny_flux, tmp_path, no_work):
    """Without overwrite, an existing output folder is refused before any work, with a hint, and not touched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    error = refused(tmp_path, tiny_flux, output=out)
    assert error.message == f"{out} already exists"
    assert error.hint == "pass --overwrite to replace it, or choose --output"


def test_overwrite_replaces_the_old_output(tiny_flux, tiny_flux_nf4, tmp_path):
    """overwrite=True removes every old file and leaves exactly a fresh complete output, nothing beside it."""
    out = tmp_path / "out"
    (out / "transformer").mkdir(parents=True)
    (out / "transformer" / "diffusion_pytorch_model-00001-of-00009.safetensors").write_bytes(b"stale")
    (out / ".hidden").write_text("stale")
    result = api.quantize_checkpoint(tiny_flux, output=out, device="cpu", overwrite=True)
    assert result.output == out
    assert os.listdir(tmp_path) == ["out"]
    assert tree(out) == tree(tiny_flux_nf4.output)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_overwrite_replaces_a_file_or_a_symlink_and_leaves_nothing_beside(tiny_flux, tmp_path, kind):
    """overwrite=True replaces a file or a symlink by the output, leaving nothing beside it and the link's target."""
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "theirs.txt").write_text("not ours to delete")
    if kind == "file":
        out.write_text("a file")
    else:
        out.symlink_to(elsewhere, target_is_directory=True)
    api.quantize_checkpoint(tiny_flux, output=out, device="cpu", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "out"]
    assert out.is_dir() and not out.is_symlink() and (out / "model_index.json").is_file()
    assert tree(elsewhere) == {"theirs.txt": b"not ours to delete"}


# Refusals before any work


@pytest.mark.parametrize("where", ["same", "inside", "parent", "through-a-link"])
def test_an_output_overlapping_the_input_is_refused(model_copy, tmp_path, no_work, where):
    """The output can be neither the input, nor inside it, nor around it (even with overwrite, even via a link)."""
    if where == "through-a-link":
        (tmp_path / "link").symlink_to(model_copy, target_is_directory=True)
    output = {"same": model_copy, "inside": model_copy / "q", "parent": tmp_path, "through-a-link": tmp_path / "link"}
    error = refused(tmp_path, model_copy, output=output[where], overwrite=True)
    assert error.message == f"the output {output[where]} overlaps the input {model_copy.resolve()}"
    assert error.hint == "choose an output folder elsewhere"


def test_a_missing_output_parent_is_refused(tiny_flux, tmp_path, no_work):
    """An output whose parent folder does not exist is refused, saying which folder and what to do."""
    error = refused(tmp_path, tiny_flux, output=tmp_path / "missing" / "out")
    assert error.message == f"the output's parent folder {(tmp_path / 'missing').resolve()} does not exist"
    assert error.hint == "create it first, or choose another --output"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tiny_flux, tmp_path, no_work):
    """device="cuda" on a machine without CUDA is refused with the way out (--device cpu)."""
    error = refused(tmp_path, tiny_flux, output=tmp_path / "out", device="cuda")
    assert (error.message, error.hint) == ("--device cuda, but PyTorch sees no CUDA GPU", "use --device cpu (slower)")


def test_an_unknown_device_is_refused(tiny_flux, tmp_path, no_work):
    """A device other than cuda or cpu is refused (the API is callable without the CLI's choices)."""
    error = refused(tmp_path, tiny_flux, output=tmp_path / "out", device="tpu")
    assert error.message == "--device must be cuda or cpu, got 'tpu'"


def test_a_folder_that_is_no_checkpoint_is_refused(tmp_path, no_work):
    """A folder with neither model_index.json nor config.json is refused, saying what qtool expects."""
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    error = refused(tmp_path, folder, output=tmp_path / "out")
    assert error.message == (
        f"{folder.resolve()} has neither model_index.json (a diffusers pipeline) nor config.json (a model)"
    )
    assert error.hint == "point qtool at a folder written by save_pretrained, or at a Hub repo id"


@pytest.mark.parametrize("part", ["pipeline", "model"])
def test_an_already_quantized_source_is_refused(tiny_flux_nf4, tmp_path, no_work, part):
    """qtool's own output, as a pipeline or as one model folder, is refused as already quantized."""
    source = tiny_flux_nf4.output if part == "pipeline" else tiny_flux_nf4.output / "transformer"
    error = refused(tmp_path, source, output=tmp_path / "out")
    assert error.message == f"{(tiny_flux_nf4.output / 'transformer').resolve()} is already quantized (bitsandbytes)"
    assert error.hint


def test_a_missing_component_is_refused_with_the_list_of_components(tiny_flux, tmp_path, no_work):
    """--components naming a component the pipeline lacks is refused, and the hint lists those it has."""
    error = refused(tmp_path, tiny_flux, output=tmp_path / "out", components=["transformer", "unet"])
    assert (error.message, error.hint) == ("no component 'unet' in this pipeline", f"it has: {', '.join(COMPONENTS)}")


def test_components_on_a_single_model_are_refused(model_copy, tmp_path, no_work):
    """--components on a model folder (no model_index.json) is refused."""
    error = refused(tmp_path, model_copy, output=tmp_path / "out", components=["transformer"])
    assert error.message.startswith("--components applies to pipelines")


@pytest.mark.parametrize("source", ["pipeline", "model"])
def test_a_skip_that_matches_nothing_is_refused(tiny_flux, model_copy, tmp_path, no_work, source):
    """A --skip name that keeps no Linear anywhere (a typo) is refused, naming it, instead of quantizing silently."""
    folder = tiny_flux if source == "pipeline" else model_copy
    spec = QuantSpec(skip=("proj_out", "to_qq"))  # proj_out is a transformer module; to_qq is a typo
    if source == "model":
        spec = QuantSpec(skip=("wi_0", "to_qq"))
    error = refused(tmp_path, folder, output=tmp_path / "out", spec=spec)
    where = "transformer, text_encoder_2" if source == "pipeline" else "T5EncoderModel"
    assert error.message == f"--skip to_qq matches no Linear layer of {where}"
    assert error.hint.startswith("name a module as the model names it, e.g. ")


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -1.0])
def test_a_threshold_json_cannot_hold_is_refused_by_the_spec(threshold):
    """llm_int8_threshold goes into config.json: NaN, infinity (not JSON) and negative values are refused."""
    with pytest.raises(QtoolError, match="--threshold must be a finite number >= 0"):
        QuantSpec(threshold=threshold)


def test_the_default_output_is_beside_a_source_that_holds_the_current_folder(model_copy, tmp_path, monkeypatch):
    """`qtool quantize .` names the output after the folder and puts it beside it (inside it would be refused)."""
    monkeypatch.chdir(model_copy)
    assert api.quantize_checkpoint(".", dry_run=True, device="cpu").output == tmp_path / "t5-nf4"
    monkeypatch.chdir(tmp_path)
    assert api.quantize_checkpoint(model_copy, dry_run=True, device="cpu").output == tmp_path / "t5-nf4"


def test_every_tensor_is_prefetched_before_it_is_read(model_copy, tmp_path, monkeypatch):
    """The disk is asked for each tensor (but the first) before it is needed, so reads overlap quantization; after
    the pass, verification reads back a sample of 3 of the 12 quantized weights (first, middle, last)."""
    from qtool.io.reader import TensorReader

    events = []
    read, prefetch = TensorReader.read, TensorReader.prefetch

    def record(kind, self, key):
        if self.component.folder == model_copy:  # the source, not the written files that verification reads
            events.append((kind, key))

    monkeypatch.setattr(
        TensorReader, "read", lambda self, key, **kw: record("read", self, key) or read(self, key, **kw)
    )
    monkeypatch.setattr(
        TensorReader, "prefetch", lambda self, key: record("prefetch", self, key) or prefetch(self, key)
    )
    api.quantize_checkpoint(model_copy, output=tmp_path / "out", device="cpu")
    reads = [key for kind, key in events if kind == "read"]
    streamed, verified = reads[:-3], reads[-3:]
    prefetched = [key for kind, key in events if kind == "prefetch"]
    assert sorted(set(streamed)) == sorted(streamed) and len(streamed) == 21  # every tensor of the T5 encoder, once
    assert all(events.index(("prefetch", key)) < events.index(("read", key)) for key in prefetched)
    assert set(streamed) - set(prefetched) == {streamed[0]}
    layers = list(plan_folder(model_copy, QuantSpec()).components[0].layers)
    assert verified == [layers[0], layers[6], layers[11]]


@pytest.mark.parametrize("spec", [QuantSpec(double_quant=True), QuantSpec(bits=8)], ids=["nf4-dq", "int8"])
def test_the_pipeline_writes_what_a_serial_run_writes(tiny_flux, tmp_path, monkeypatch, spec):
    """Three items in flight (reads, quantization and writes overlapping, slots reused) write the same bytes as one
    item at a time, quantize and dequantize alike."""
    from qtool import dequant, pipeline

    outputs = {}
    for slots in (1, 3):
        monkeypatch.setattr(pipeline, "DEFAULT_SLOTS", slots)
        out = tmp_path / f"q{slots}"
        api.quantize_checkpoint(tiny_flux, spec=spec, output=out, device="cpu")
        dequant.dequantize_checkpoint(out, output=tmp_path / f"d{slots}", device="cpu")
        outputs[slots] = (tree(out), tree(tmp_path / f"d{slots}"))
    assert outputs[1] == outputs[3]


@pytest.mark.parametrize("spec", [QuantSpec(double_quant=True), QuantSpec(bits=8)], ids=["nf4-dq", "int8"])
def test_each_tensor_is_written_once_at_its_place(tiny_flux, tmp_path, monkeypatch, spec):
    """The writer is told the run's plan, and layers arrive in layout order: no spool file, no copy at close (each
    byte goes to disk once), and the files are those of the writer without a plan."""
    from qtool import dequant
    from qtool.io import writer as writer_module

    made, copies = [], []
    create, copy = writer_module.ShardedWriter._create, writer_module._copy_range
    monkeypatch.setattr(writer_module.ShardedWriter, "_create", lambda self, suffix, *a: made.append(suffix) or
                        create(self, suffix, *a))  # fmt: skip
    monkeypatch.setattr(writer_module, "_copy_range", lambda *a: copies.append(a) or copy(*a))
    api.quantize_checkpoint(tiny_flux, spec=spec, output=tmp_path / "q", device="cpu")
    dequant.dequantize_checkpoint(tmp_path / "q", output=tmp_path / "d", device="cpu")
    assert ".spool" not in made and made and copies == []
    monkeypatch.setattr(api, "_writer_plan", lambda *a: None)
    monkeypatch.setattr(dequant, "_writer_plan", lambda *a: None)
    api.quantize_checkpoint(tiny_flux, spec=spec, output=tmp_path / "q0", device="cpu")
    dequant.dequantize_checkpoint(tmp_path / "q0", output=tmp_path / "d0", device="cpu")
    assert ".spool" in made and copies
    assert (tree(tmp_path / "q"), tree(tmp_path / "d")) == (tree(tmp_path / "q0"), tree(tmp_path / "d0"))


# What a run copies


def test_git_caches_and_root_checkpoints_are_neither_copied_nor_reported(tiny_flux, tmp_path):
    """A clone's .git and .cache, its root checkpoints and its model card (it describes the source) are not copied,
    and ``copied`` lists what was; qtool.json records where the output came from."""
    source = tmp_path / "flux-clone"
    shutil.copytree(tiny_flux, source, copy_function=os.link)
    (source / ".git" / "lfs").mkdir(parents=True)
    (source / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (source / ".cache" / "huggingface").mkdir(parents=True)
    (source / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
    for name in ROOT_EXTRAS:
        (source / name).write_bytes(b"never copied")
    result = api.quantize_checkpoint(source, output=tmp_path / "out", device="cpu")
    expected = sorted({*COMPONENTS, "model_index.json", "dev_grid.jpg"})
    assert sorted(os.listdir(tmp_path / "out")) == sorted([*expected, "qtool.json"])
    assert result.copied == sorted(set(expected) - set(QUANTIZED))


# Dry runs


SPECS = [QuantSpec(), QuantSpec(double_quant=True, blocksize=128), QuantSpec(quant_type="fp4", blocksize=32),
         QuantSpec(bits=8)]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.label}-{s.blocksize}")
def test_a_dry_run_writes_nothing_and_predicts_the_run(tiny_flux, tmp_path, monkeypatch, spec):
    """A dry run writes nothing and reports the run's components, copies and sizes (within a few bytes per layer)."""
    monkeypatch.chdir(tmp_path)
    dry = api.quantize_checkpoint(tiny_flux, spec=spec, dry_run=True, device="cpu")
    assert os.listdir(tmp_path) == []
    assert dry.dry_run and dry.output == tmp_path / f"tiny-flux-{spec.label}"
    real = api.quantize_checkpoint(tiny_flux, spec=spec, output=tmp_path / "real", device="cpu")
    assert (dry.kind, dry.copied) == (real.kind, real.copied)
    assert [c.name for c in dry.components] == [c.name for c in real.components] == list(QUANTIZED)
    for d, r in zip(dry.components, real.components, strict=True):
        assert (d.class_name, d.parameters, d.layers_quantized, d.layers_kept, d.bytes_before) == (
            r.class_name, r.parameters, r.layers_quantized, r.layers_kept, r.bytes_before,
        )  # fmt: skip
        assert r.layers_quantized == LAYERS[r.name]
        assert abs(d.bytes_after - r.bytes_after) <= (0 if spec.bits == 8 else 16 * r.layers_quantized), d.name
        assert (d.seconds, d.quality, d.layer_quality, d.files) == (0.0, None, [], [])


# The Hub path, with qtool.hub faked


@pytest.fixture(scope="module")
def repo(tiny_flux, tmp_path_factory) -> Path:
    """tiny_flux as a Hub repo's files, with the root files a real FLUX.1-dev repo has beside the pipeline."""
    folder = tmp_path_factory.mktemp("repo") / "tiny-flux"
    shutil.copytree(tiny_flux, folder)
    for name in ROOT_EXTRAS:
        (folder / name).write_bytes(b"never fetched")
    return folder


@pytest.fixture
def hub(fake_hub, repo, tmp_path, monkeypatch):
    """The fake Hub serving REPO; the working directory (where default outputs go) is tmp_path."""
    fake_hub.serve(REPO, repo)
    monkeypatch.chdir(tmp_path)
    return fake_hub


def fetched(hub, repo_id: str) -> set[str]:
    """The repo files that the downloads so far matched."""
    patterns = [p for call in hub.downloaded_patterns() for p in call]
    return {f for f in hub.files(repo_id) if any(fnmatch.fnmatch(f, p) for p in patterns)}


def assert_calls_carry_revision_and_token(hub) -> None:
    assert hub.calls, "no Hub call was made"
    for name, _, kwargs in hub.calls:
        assert (kwargs["revision"], kwargs["token"]) == (REVISION, TOKEN), name


def test_download_patterns_fetch_the_pipeline_and_never_root_checkpoints(hub):
    """A pipeline repo's download is model_index.json, its card and the component folders, never its other root
    files."""
    patterns = api.download_patterns(REPO, revision=REVISION, token=TOKEN)
    files = hub.files(REPO)
    matched = {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)}
    assert matched == {"model_index.json", "README.md"} | {f for f in files if f.split("/")[0] in COMPONENTS}
    assert not matched & NEVER_FETCHED
    assert_calls_carry_revision_and_token(hub)


def test_download_patterns_of_a_model_repo_fetch_the_whole_model(fake_hub, tiny_flux):
    """From a one-model repo (no model_index.json): its config, index and every shard."""
    fake_hub.serve("acme/t5", tiny_flux / "text_encoder_2")
    patterns = api.download_patterns("acme/t5", revision=None, token=None)
    files = fake_hub.files("acme/t5")
    assert {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)} == set(files)


def test_a_dry_run_on_a_repo_reads_json_and_headers_only(hub, tiny_flux, tmp_path):
    """A dry run on a repo downloads only *.json, reads headers, writes nothing, and matches a local dry run."""
    result = api.quantize_checkpoint(REPO, dry_run=True, revision=REVISION, token=TOKEN, device="cpu")
    assert hub.downloaded_patterns() == [["*.json"]]
    assert all(f.endswith(".json") for f in fetched(hub, REPO))
    headers = {f for name, _, kwargs in hub.calls if name == "safetensors_headers" for f in kwargs["filenames"]}
    assert headers == {f for f in hub.files(REPO) if f.split("/")[0] in QUANTIZED and f.endswith(".safetensors")}
    assert os.listdir(tmp_path) == []
    local = api.quantize_checkpoint(tiny_flux, dry_run=True, device="cpu")
    assert (result.kind, result.copied, result.output) == (local.kind, local.copied, tmp_path / "tiny-flux-nf4")
    assert [vars(c) for c in result.components] == [vars(c) for c in local.components]
    assert_calls_carry_revision_and_token(hub)
    assert TOKEN not in repr(result) and TOKEN not in json.dumps(result.to_dict())


def test_a_run_through_the_hub_writes_what_a_local_run_writes(hub, tiny_flux_nf4, tmp_path):
    """A run on a repo writes a local run's output byte for byte, but for the provenance record (qtool.json), which
    names the repo and revision; revision and token reach the Hub, and the token never reaches the output."""
    result = api.quantize_checkpoint(REPO, revision=REVISION, token=TOKEN, device="cpu")
    assert not fetched(hub, REPO) & NEVER_FETCHED
    assert result.output == tmp_path / "tiny-flux-nf4" and os.listdir(tmp_path) == ["tiny-flux-nf4"]
    ours_tree, local_tree = tree(result.output), tree(tiny_flux_nf4.output)
    provenance, local_provenance = (json.loads(t.pop("qtool.json")) for t in (ours_tree, local_tree))
    assert ours_tree == local_tree
    assert (provenance["source"], provenance["source_is_hub_repo"], provenance["source_revision"]) == (
        REPO,
        True,
        REVISION,
    )
    assert local_provenance["source"] == str(tiny_flux_nf4.source) and not local_provenance["source_is_hub_repo"]
    assert {k: v for k, v in provenance.items() if not k.startswith("source")} == {
        k: v for k, v in local_provenance.items() if not k.startswith("source")
    }
    volatile = {"output", "source", "seconds", "peak_rss_bytes"}
    ours, local = result.to_dict(), tiny_flux_nf4.to_dict()
    for data in (ours, local):
        for component in data["components"]:
            component.pop("seconds")
            component.pop("pipeline")  # timings
    assert {k: v for k, v in ours.items() if k not in volatile} == {k: v for k, v in local.items() if k not in volatile}
    assert ours["source"] == REPO
    assert_calls_carry_revision_and_token(hub)
    assert TOKEN not in repr(result) and TOKEN not in json.dumps(ours)
    assert not any(TOKEN.encode() in data for data in tree(tmp_path).values())


@pytest.mark.parametrize("case", ["missing-component", "already-quantized", "components-on-a-model"])
def test_a_refusal_on_a_repo_comes_before_downloading_weights(
    fake_hub, tiny_flux, tiny_flux_nf4, tmp_path, monkeypatch, case
):
    """Refusals that the repo's JSON files decide come before any weight is downloaded, and never show the token."""
    monkeypatch.chdir(tmp_path)
    served = {"missing-component": tiny_flux, "already-quantized": tiny_flux_nf4.output,
              "components-on-a-model": tiny_flux / "text_encoder_2"}[case]  # fmt: skip
    fake_hub.serve("acme/x", served)
    components = None if case == "already-quantized" else ["unet"]
    with pytest.raises(QtoolError) as info:
        api.quantize_checkpoint("acme/x", components=components, revision=REVISION, token=TOKEN, device="cpu")
    expected = {"missing-component": "no component 'unet' in this pipeline",
                "already-quantized": "is already quantized (bitsandbytes)",
                "components-on-a-model": "--components applies to pipelines"}[case]  # fmt: skip
    assert expected in info.value.message
    assert not any(f.endswith(".safetensors") for f in fetched(fake_hub, "acme/x"))
    assert TOKEN not in f"{info.value.message} {info.value.hint}"
    assert os.listdir(tmp_path) == []


# QuantizeResult.to_dict


RESULT_TYPES = {"output": str, "source": str, "kind": str, "method": str, "quantization_config": dict,
                "budget": (dict, type(None)), "dry_run": bool, "device": str, "seconds": float, "peak_rss_bytes": int,
                "copied": list, "components": list}  # fmt: skip
COMPONENT_TYPES = {"name": str, "class": str, "method": (str, type(None)), "parameters": int, "layers_quantized": int,
                   "layers_kept": int, "layers_kept_by_budget": int, "bytes_before": int, "bytes_after": int,
                   "seconds": float, "quality": (dict, type(None)), "files": list,
                   "pipeline": (dict, type(None))}  # fmt: skip
FIGURE = (float, type(None))
QUALITY_TYPES = {"layers": int, "layers_nonfinite": int, "sqnr_mean_db": FIGURE, "sqnr_min_db": FIGURE,
                 "sqnr_db": FIGURE, "rel_fro": FIGURE, "max_abs_err": FIGURE, "extreme_share": FIGURE}  # fmt: skip
PIPELINE_TYPES = {"stage_seconds": dict, "items": int, "slots": int, "slot_bytes": int, "bytes_read": int,
                  "bytes_written": int, "peak_gpu_bytes": (int, type(None))}  # fmt: skip
STAGES = ["wall", "read", "compute", "wait", "write", "starved", "finish", "verify"]


def check_schema(data: dict) -> None:
    assert list(data) == list(RESULT_TYPES)
    for key, kinds in RESULT_TYPES.items():
        assert type(data[key]) in (kinds if isinstance(kinds, tuple) else (kinds,)), key  # exact: a bool is no int
    assert all(type(name) is str for name in data["copied"])
    for component in data["components"]:
        assert list(component) == list(COMPONENT_TYPES)
        for key, kinds in COMPONENT_TYPES.items():
            assert type(component[key]) in (kinds if isinstance(kinds, tuple) else (kinds,)), key
        assert all(type(name) is str for name in component["files"])
        if component["quality"] is not None:
            assert list(component["quality"]) == list(QUALITY_TYPES)
            for key, kinds in QUALITY_TYPES.items():
                assert type(component["quality"][key]) in (kinds if isinstance(kinds, tuple) else (kinds,)), key
        if component["pipeline"] is not None:
            assert list(component["pipeline"]) == list(PIPELINE_TYPES)
            for key, kinds in PIPELINE_TYPES.items():
                assert type(component["pipeline"][key]) in (kinds if isinstance(kinds, tuple) else (kinds,)), key
            seconds = component["pipeline"]["stage_seconds"]
            assert list(seconds) == STAGES and all(type(v) is float for v in seconds.values())
    # Strict JSON (no NaN or Infinity), and a lossless round trip.
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_to_dict_of_a_run(tiny_flux_nf4):
    """to_dict() of a run: the documented keys and types, the run's values, strict JSON."""
    data = tiny_flux_nf4.to_dict()
    check_schema(data)
    assert (data["kind"], data["method"], data["dry_run"], data["device"]) == ("pipeline", "nf4", False, "cpu")
    assert data["output"] == str(tiny_flux_nf4.output)
    assert data["quantization_config"] == QuantSpec().quantization_config()
    assert data["peak_rss_bytes"] > 0 and data["seconds"] > 0
    assert [c["name"] for c in data["components"]] == list(QUANTIZED)
    for c in data["components"]:
        assert c["layers_quantized"] == LAYERS[c["name"]] and c["bytes_after"] < c["bytes_before"]
        assert 15 < c["quality"]["sqnr_min_db"] <= c["quality"]["sqnr_mean_db"] < 30
        assert c["files"] and all((tiny_flux_nf4.output / c["name"] / f).is_file() for f in c["files"])
        stages, seconds = c["pipeline"], c["pipeline"]["stage_seconds"]
        written = sum((tiny_flux_nf4.output / c["name"] / f).stat().st_size for f in c["files"])
        assert (stages["bytes_read"], stages["bytes_written"]) == (c["bytes_before"], written)
        assert stages["items"] >= c["layers_quantized"] and stages["slots"] >= 1
        assert seconds["wall"] + seconds["finish"] + seconds["verify"] <= c["seconds"] + 0.003  # (rounded)
        assert stages["peak_gpu_bytes"] is None  # a CPU run


def test_to_dict_of_a_dry_run(tiny_flux):
    """to_dict() of a dry run: the same schema, with no timings, quality figures or files."""
    data = api.quantize_checkpoint(tiny_flux, spec=QuantSpec(bits=8), dry_run=True, device="cpu").to_dict()
    check_schema(data)
    assert (data["method"], data["dry_run"], data["peak_rss_bytes"]) == ("int8", True, 0)
    for c in data["components"]:
        measured = (c["seconds"], c["quality"], c["files"], c["pipeline"])
        assert measured == (0.0, None, [], None)


# The quality report (and the same figures in to_dict, qtool.json)


def measured_again(source: Path, out: Path, layers) -> dict[str, tuple]:
    """Per quantized layer of a written component, its figures computed anew from the files: the source weight and
    the written entries dequantized to float32 (qtool.quantize.dequantize_tensor), in float64: (elements, extreme
    codes, sum w^2, sum (w - q)^2, max |w - q|). Extreme codes from the stored codes: 4-bit unpacked by the
    reference (+-1: NF4 0 and 15, FP4 3 and 11), int8 +-127."""
    from bnb_loading import read_all

    from qtool.formats.layers import quantized_layers
    from qtool.quantize import dequantize_tensor
    from qtool.reference.quant4 import unpack_4bit_ref

    extreme_codes = {"nf4": {0, 15}, "fp4": {3, 11}}
    source_tensors, written = read_all(source), read_all(out)
    found = quantized_layers(written)
    assert sorted(found) == sorted(q.key for q in layers)
    figures = {}
    for key, layer in found.items():
        entries = {name: written[k] for name, k in layer.entries.items()}
        w = source_tensors[key].double()
        q = dequantize_tensor(entries, dtype=torch.float32).double()
        if layer.bits == 8:
            extreme = int((entries["weight"].to(torch.int16).abs() == 127).sum())
        else:
            quant_type = next(k for k in entries if "quant_state" in k).rpartition("__")[2]
            codes = unpack_4bit_ref(entries["weight"], w.numel()).tolist()
            extreme = sum(c in extreme_codes[quant_type] for c in codes)
        figures[key] = (w.numel(), extreme, float(w.square().sum()), float((w - q).square().sum()),
                        float((w - q).abs().max()))  # fmt: skip
    return figures


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec(quant_type="fp4", double_quant=True), QuantSpec(bits=8)],
                         ids=lambda s: s.label)  # fmt: skip
def test_the_quality_figures_are_those_of_the_written_layers(tiny_flux, tmp_path, spec):
    """Each layer's figures (measured on the device during the run) equal the same figures computed anew in float64
    from the written files and the source: counts exactly, sums and errors to float32 rounding (1e-6; the report's
    6 digits: 5e-6). Each component's figures are aggregate() of its layers' wherever they appear: the result,
    to_dict (--json), the report file and qtool.json, and they equal the float64 sums' own."""
    from qtool.quality import aggregate

    report = tmp_path / "quality.json"
    result = api.quantize_checkpoint(tiny_flux, spec=spec, output=tmp_path / "out", device="cpu", report=report)
    data = json.loads(report.read_text())
    assert data == json.loads(json.dumps(result.report(), allow_nan=False))
    provenance = json.loads((tmp_path / "out" / "qtool.json").read_text())
    plans = {c.name: c for c in plan_folder(tiny_flux, spec).components}
    for c, reported, as_dict in zip(result.components, data["components"], result.to_dict()["components"], strict=True):
        assert [q.key for q in c.layer_quality] == list(plans[c.name].layers)  # the plan's order
        again = measured_again(tiny_flux / c.name, tmp_path / "out" / c.name, c.layer_quality)
        for q, layer in zip(c.layer_quality, reported["layers"], strict=True):
            elements, extreme, signal, noise, max_err = again[q.key]
            assert (q.elements, q.extreme, q.status, q.method) == (elements, extreme, "ok", spec.label), q.key
            assert q.extreme > 0
            assert math.isclose(q.sqnr_db, 10 * math.log10(signal / noise), rel_tol=1e-6), q.key
            assert math.isclose(q.rel_fro, math.sqrt(noise / signal), rel_tol=1e-6), q.key
            assert math.isclose(q.max_abs_err, max_err, rel_tol=1e-6), q.key
            assert layer["key"] == q.key and layer["shape"] == list(q.shape) and layer["extreme"] == extreme
            assert math.isclose(layer["sqnr_db"], 10 * math.log10(signal / noise), rel_tol=5e-6), q.key
            assert math.isclose(layer["extreme_share"], extreme / elements, rel_tol=5e-6), q.key
        quality = aggregate(c.layer_quality).to_dict()
        assert reported["quality"] == as_dict["quality"] == provenance["quality"][c.name] == quality
        signal, noise = sum(f[2] for f in again.values()), sum(f[3] for f in again.values())
        assert math.isclose(quality["sqnr_db"], 10 * math.log10(signal / noise), rel_tol=5e-6)
        assert math.isclose(quality["rel_fro"], math.sqrt(noise / signal), rel_tol=5e-6)
        assert math.isclose(quality["max_abs_err"], max(f[4] for f in again.values()), rel_tol=5e-6)
        extreme = sum(f[1] for f in again.values()) / sum(f[0] for f in again.values())
        assert math.isclose(quality["extreme_share"], extreme, rel_tol=5e-6)
        assert quality["layers"] == len(again) and quality["sqnr_min_db"] <= quality["sqnr_mean_db"]


def test_the_report_file_has_the_settings_and_every_layer(tiny_flux_nf4, model_copy, tmp_path):
    """The report: its version, qtool's, where from and to, the settings (QuantSpec's fields, scale_search
    included), quantization_config, and per component its class, figures and every layer; strict JSON."""
    spec = QuantSpec(double_quant=True, blocksize=128, skip=("wi_0",), scale_search=True)
    report = tmp_path / "r.json"
    result = api.quantize_checkpoint(model_copy, spec=spec, output=tmp_path / "out", device="cpu", report=report)
    data = json.loads(report.read_text())
    assert list(data) == ["report_version", "qtool_version", "source", "output", "device", "method", "settings",
                          "quantization_config", "budget", "components"]  # fmt: skip
    assert (data["report_version"], data["source"], data["output"], data["device"], data["method"]) == (
        1, str(model_copy), str(tmp_path / "out"), "cpu", "nf4-dq",
    )  # fmt: skip
    assert data["settings"] == {"bits": 4, "quant_type": "nf4", "double_quant": True, "blocksize": 128,
                                "compute_dtype": "bf16", "skip": ["wi_0"], "threshold": 6.0,
                                "scale_search": True}  # fmt: skip
    assert data["quantization_config"] == spec.quantization_config()
    assert data["budget"] is None
    (component,) = data["components"]
    assert (component["name"], component["class"], component["method"]) == ("", "T5EncoderModel", "nf4-dq")
    assert component["quantization_config"] == spec.quantization_config()
    assert len(component["layers"]) == result.components[0].layers_quantized == component["quality"]["layers"] == 10
    assert list(component["layers"][0]) == ["key", "shape", "method", "status", "sqnr_db", "rel_fro", "max_abs_err",
                                            "extreme_share", "elements", "extreme", "signal", "noise"]  # fmt: skip
    assert report.read_text().endswith("}\n") and sorted(os.listdir(tmp_path)) == ["out", "r.json", "t5"]
    assert "r.json" not in os.listdir(tmp_path / "out")


def test_the_report_replaces_a_file_atomically_and_not_through_a_hard_link(model_copy, tmp_path):
    """An existing report is replaced by a rename (a hard link to it keeps the old text), nothing left beside."""
    report, link = tmp_path / "q.json", tmp_path / "link.json"
    report.write_text("old")
    os.link(report, link)
    api.quantize_checkpoint(model_copy, output=tmp_path / "out", device="cpu", report=report)
    assert json.loads(report.read_text())["method"] == "nf4" and link.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["link.json", "out", "q.json", "t5"]


def test_a_report_inside_the_output_is_written_with_it(model_copy, tmp_path):
    """A report path inside the output goes into the temporary folder and appears with the output (--overwrite
    too); one that would replace a file of the output is refused, and nothing is written."""
    out = tmp_path / "out"
    api.quantize_checkpoint(model_copy, output=out, device="cpu", report=out / "reports" / "q.json")
    assert json.loads((out / "reports" / "q.json").read_text())["output"] == str(out)
    api.quantize_checkpoint(model_copy, output=out, device="cpu", report=out / "q.json", overwrite=True)
    assert "q.json" in os.listdir(out) and "reports" not in os.listdir(out)  # the old output is gone
    before = tree(tmp_path)
    with pytest.raises(QtoolError) as info:
        api.quantize_checkpoint(model_copy, output=out, device="cpu", report=out / "config.json", overwrite=True)
    assert info.value.message == f"the report {out / 'config.json'} would replace config.json of the output"
    assert tree(tmp_path) == before


def test_report_refusals_come_before_any_work(model_copy, tmp_path, no_work):
    """A report that is a folder, the output, inside the input, in a missing folder, or asked of a dry run: one
    clear error before any tensor is read, and nothing written."""
    (tmp_path / "folder").mkdir()
    out = tmp_path / "out"
    cases = {
        tmp_path / "folder": (f"the report {tmp_path / 'folder'} is a folder", "give --report a file name, e.g. "
                              "quality.json"),
        out: (f"the report {out} is the output folder", "give --report a file name, e.g. quality.json"),
        model_copy / "q.json": (f"the report {model_copy / 'q.json'} is inside the input {model_copy.resolve()}",
                                "qtool never writes to its input: choose a path elsewhere"),
        tmp_path / "no" / "q.json": (f"the report's folder {tmp_path / 'no'} does not exist",
                                     "create it first, or choose another --report path"),
    }  # fmt: skip
    for report, expected in cases.items():
        error = refused(tmp_path, model_copy, output=out, report=report)
        assert (error.message, error.hint) == expected
    error = refused(tmp_path, model_copy, output=out, report=tmp_path / "q.json", dry_run=True)
    assert (error.message, error.hint) == (
        "--report and --dry-run conflict",
        "a dry run quantizes nothing to report on",
    )


def test_a_failed_run_writes_no_report(model_copy, tmp_path, monkeypatch):
    """A run that fails midway leaves neither output nor report."""
    fail_on_call(monkeypatch, "qtool.quantize.quantize_pending", 5, RuntimeError("injected"))
    with pytest.raises(RuntimeError):
        api.quantize_checkpoint(model_copy, output=tmp_path / "out", device="cpu", report=tmp_path / "q.json")
    assert os.listdir(tmp_path) == ["t5"]

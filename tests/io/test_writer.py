"""ShardedWriter against safetensors.torch.save_file and diffusers' save_pretrained, byte for byte."""

import errno
import gc
import hashlib
import json
import os
import random
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_equal
from qtool.io import writer as writer_module
from qtool.io.writer import Planned, ShardedWriter


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype qtool writes, 0-d, 0-size, odd sizes and a transposed view; insertion order is not sorted."""
    return {
        "zeta.weight": torch.randint(0, 256, (13, 1), dtype=torch.uint8),
        "alpha.weight": torch.randn(7, 5).bfloat16(),
        "Beta.absmax": torch.randn(3),
        "mid.SCB": torch.randn(1).abs(),
        "mid.weight": torch.randint(-128, 128, (3, 5), dtype=torch.int8),
        "scalar": torch.tensor(1.25),
        "empty": torch.zeros(0, 4),
        "empty_u8": torch.zeros(0, dtype=torch.uint8),
        "half.bias": torch.randn(9).half(),
        "a10": torch.randn(2),
        "a9": torch.randn(2),
        "transposed": torch.randn(4, 6).t(),
        "ünïcode.wéight": torch.randn(3),
    }


def write(folder: Path, groups: list[dict[str, torch.Tensor]], max_shard_size: int = 10**10, **kw) -> list[Path]:
    with ShardedWriter(folder, "model", max_shard_size, **kw) as w:
        for group in groups:
            w.add_group(group)
    return w.close()


@pytest.mark.parametrize("grouping", ["one_group", "each_alone"])
def test_single_shard_equals_save_file(tmp_path, grouping):
    tensors = mixed_tensors()
    groups = [tensors] if grouping == "one_group" else [{k: v} for k, v in tensors.items()]
    files = write(tmp_path / "out", groups)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert files == [tmp_path / "out" / "model.safetensors"]
    assert sha256(files[0]) == sha256(tmp_path / "ref.safetensors")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]  # no spool or partial file left


def test_every_dtype_equals_save_file(tmp_path):
    """The layout order (writer.LAYOUT_ORDER) over every dtype the writer takes, keys shuffled."""
    tensors = {}
    for i, dtype in enumerate(writer_module._TAGS):
        for name in (f"k{i}", f"K{i}", f"k{i}0"):
            tensors[name] = torch.randint(0, 100, (i % 3 + 1, 3), dtype=torch.uint8).to(dtype)
    keys = list(tensors)
    random.Random(0).shuffle(keys)
    tensors = {k: tensors[k] for k in keys}
    write(tmp_path / "out", [tensors])
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert sha256(tmp_path / "out" / "model.safetensors") == sha256(tmp_path / "ref.safetensors")


@pytest.mark.parametrize("metadata", [{}, {"format": "pt"}, {"qtool": 'quoted "ü\n" text'}])
def test_metadata_equals_save_file(tmp_path, metadata):
    tensors = {"b": torch.randn(3), "a": torch.ones(1, dtype=torch.int8)}
    write(tmp_path / "out", [tensors], metadata=metadata)
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    assert sha256(tmp_path / "out" / "model.safetensors") == sha256(tmp_path / "ref.safetensors")


def layer(name: str, n: int) -> dict[str, torch.Tensor]:
    """A 4-bit layer's group as bnb saves it: packed weight, absmax, quant_map, JSON blob. n codes -> 2n + 25 bytes."""
    return {
        f"{name}.weight": torch.randint(0, 256, (n, 1), dtype=torch.uint8),
        f"{name}.weight.absmax": torch.randn(n // 4),
        f"{name}.weight.quant_map": torch.randn(4),
        f"{name}.weight.quant_state.bitsandbytes__nf4": torch.randint(0, 256, (9,), dtype=torch.uint8),
    }


def test_sharding_keeps_groups_whole(tmp_path):
    # A layer of n=40 codes is 105 bytes; a 250-byte limit fits two of them.
    groups = [layer(f"blocks.{i}", 40) for i in range(5)] + [{"norm.weight": torch.randn(10)}]
    sizes = [sum(t.nbytes for t in g.values()) for g in groups]
    assert sizes == [105] * 5 + [40]
    out = tmp_path / "out"
    with ShardedWriter(out, "diffusion_pytorch_model", 250) as w:
        for group in groups:
            w.add_group(group)
        assert w.total_size == sum(sizes)
    files = w.close()
    names = [f"diffusion_pytorch_model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert [f.name for f in files] == names + ["diffusion_pytorch_model.safetensors.index.json"]
    assert sorted(os.listdir(out)) == sorted(f.name for f in files)
    # Greedy: [0, 1] (210), [2, 3] (210), [4, norm] (145).
    expected_shards = [groups[0] | groups[1], groups[2] | groups[3], groups[4] | groups[5]]
    for name, expected in zip(names, expected_shards, strict=True):
        loaded = load_file(out / name)
        assert set(loaded) == set(expected)
        for key, tensor in expected.items():
            assert_equal(loaded[key], tensor, key)
        save_file(expected, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert sha256(out / name) == sha256(tmp_path / "ref.safetensors")
    weight_map = {key: name for name, shard in zip(names, expected_shards, strict=True) for key in shard}
    assert w.weight_map == weight_map
    assert list(w.weight_map) == [k for g in groups for k in g]  # insertion order
    index_text = (out / "diffusion_pytorch_model.safetensors.index.json").read_text(encoding="utf-8")
    assert (
        index_text
        == json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2, sort_keys=True)
        + "\n"
    )


def test_oversized_group_gets_its_own_shard_first(tmp_path):
    """As huggingface_hub: an over-limit group is shard k at once; the shard still open becomes k + 1."""
    a, big, c = {"a": torch.randn(10)}, layer("big", 100), {"c": torch.randn(10)}
    files = write(tmp_path, [a, big, c], max_shard_size=100)
    assert [f.name for f in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert set(load_file(files[0])) == set(big)
    assert set(load_file(files[1])) == {"a", "c"}


def test_group_exactly_at_the_limit_shares_nothing(tmp_path):
    files = write(tmp_path, [{"a": torch.randn(25)}, {"b": torch.randn(25)}, {"c": torch.randn(1)}], 100)
    assert [set(load_file(f)) for f in files[:-1]] == [{"a"}, {"b"}, {"c"}]


def test_matches_diffusers_save_pretrained(tmp_path):
    """Every file (shards and index) equals save_pretrained's for the same state dict and max_shard_size."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    class Tiny(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, width: int = 24):
            super().__init__()
            self.proj_in = torch.nn.Linear(width, 40)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(40, 40) for _ in range(3)])
            self.head = torch.nn.Linear(40, 7, dtype=torch.bfloat16)
            self.register_buffer("codes", torch.randint(0, 256, (333,), dtype=torch.uint8))
            self.register_buffer("scale", torch.tensor(0.5))
            self.register_buffer("signed", torch.randint(-128, 128, (5, 3), dtype=torch.int8))
            self.register_buffer("nothing", torch.zeros(0, 3, dtype=torch.float16))
            self.register_buffer("f16", torch.randn(9, dtype=torch.float16))

    model = Tiny()
    # 3000 bytes: the 6400-byte block weights exceed it (own shards), the rest packs greedily.
    model.save_pretrained(tmp_path / "diffusers", max_shard_size=3000)
    ours = tmp_path / "qtool"
    with ShardedWriter(ours, "diffusion_pytorch_model", 3000) as w:
        for key, tensor in model.state_dict().items():
            w.add_group({key: tensor})
    files = w.close()
    theirs = sorted(p for p in (tmp_path / "diffusers").iterdir() if p.name != "config.json")
    assert len(theirs) == 6  # 5 shards + index
    assert sorted(files) == [ours / p.name for p in theirs]
    for p in theirs:
        assert (ours / p.name).read_bytes() == p.read_bytes(), p.name


def test_add_group_keeps_no_reference(tmp_path):
    with ShardedWriter(tmp_path, "model", 10**6) as w:
        tensor = torch.randn(64, 64)
        view = torch.randn(64, 64).t()  # non-contiguous: the writer makes a contiguous copy, then drops it
        refs = [weakref.ref(tensor), weakref.ref(view)]
        w.add_group({"w": tensor, "v": view})
        del tensor, view
        gc.collect()
        assert [r() for r in refs] == [None, None]


def test_abort_removes_everything(tmp_path):
    (tmp_path / "README.md").write_text("not ours")
    w = ShardedWriter(tmp_path, "model", 100)
    for i in range(5):  # several finished shards plus an open spool
        w.add_group({f"t{i}": torch.randn(20)})
    assert len(os.listdir(tmp_path)) > 2
    w.abort()
    assert os.listdir(tmp_path) == ["README.md"]
    w.abort()  # idempotent
    with pytest.raises(RuntimeError):
        w.add_group({"x": torch.randn(1)})


def test_exception_in_with_block_aborts_and_removes_created_folder(tmp_path):
    out = tmp_path / "new" / "transformer"
    with pytest.raises(KeyError):
        with ShardedWriter(out, "model", 100) as w:
            w.add_group({"a": torch.randn(30)})
            w.add_group({"b": torch.randn(30)})
            raise KeyError("boom")
    assert not out.exists()


def test_abort_after_close_removes_outputs(tmp_path):
    w = ShardedWriter(tmp_path, "model", 10)
    w.add_group({"a": torch.randn(3)})
    w.add_group({"b": torch.randn(3)})
    assert len(w.close()) == 3
    w.abort()
    assert os.listdir(tmp_path) == []


def test_failed_close_aborts(tmp_path, monkeypatch):
    w = ShardedWriter(tmp_path, "model", 10)
    w.add_group({"a": torch.randn(3)})
    w.add_group({"b": torch.randn(3)})

    replace = os.replace

    def fail_on_index(src, dst):
        if str(dst).endswith(".index.json"):  # the last step: both shards already have their final names
            raise OSError(errno.ENOSPC, "disk full")
        replace(src, dst)

    monkeypatch.setattr(writer_module.os, "replace", fail_on_index)
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert os.listdir(tmp_path) == []


def test_failure_while_finishing_an_oversized_group_leaves_nothing_after_abort(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("not ours")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "disk full")

    w = ShardedWriter(tmp_path, "model", 100)
    w.add_group({"small": torch.randn(2)})
    monkeypatch.setattr(writer_module, "_copy_range", fail)
    with pytest.raises(OSError, match="disk full"):
        w.add_group({"big": torch.randn(100)})  # its own shard, finished at once
    w.abort()
    assert os.listdir(tmp_path) == ["README.md"]


def test_copy_without_copy_file_range_and_small_chunks(tmp_path, monkeypatch):
    """The pread/write fallback (filesystems that refuse copy_file_range) and multi-chunk copies give the same bytes."""
    tensors = mixed_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(writer_module, "COPY_CHUNK_BYTES", 7)
    write(tmp_path / "kernel", [tensors])
    assert sha256(tmp_path / "kernel" / "model.safetensors") == sha256(tmp_path / "ref.safetensors")

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(writer_module.os, "copy_file_range", refuse, raising=False)
    write(tmp_path / "fallback", [tensors])
    assert sha256(tmp_path / "fallback" / "model.safetensors") == sha256(tmp_path / "ref.safetensors")


def test_rejects_bad_input_without_writing(tmp_path):
    w = ShardedWriter(tmp_path, "model", 1000)
    w.add_group({"a": torch.randn(2)})
    for bad in (
        {},
        {"a": torch.randn(2)},  # repeated key
        {"b": torch.randn(2), "__metadata__": torch.randn(1)},
        {"c": [1.0]},
        {"d": torch.randn(4, 4).to_sparse()},
        {"e": torch.zeros(2, dtype=torch.float4_e2m1fn_x2)},
        {"f": torch.zeros(2, device="meta")},
    ):
        with pytest.raises(ValueError):
            w.add_group(bad)
    assert w.total_size == 8
    with pytest.raises(RuntimeError, match="after close"):
        _ = w.weight_map
    w.close()
    assert list(load_file(tmp_path / "model.safetensors")) == ["a"]
    assert w.close() == [tmp_path / "model.safetensors"]  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        w.add_group({"z": torch.randn(1)})


def test_empty_writer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no tensors"):
        with ShardedWriter(tmp_path, "model", 1000):
            pass
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("size", [0, -1, 1.5, "10GB", True])
def test_max_shard_size_must_be_positive_int(tmp_path, size):
    with pytest.raises(ValueError, match="max_shard_size"):
        ShardedWriter(tmp_path, "model", size)


@pytest.mark.parametrize("base", ["", ".hidden", "a/b", "..\\x"])
def test_base_name_must_be_plain(tmp_path, base):
    with pytest.raises(ValueError, match="base_name"):
        ShardedWriter(tmp_path, base, 100)


# --- with a plan: each tensor written once, at its place -------------------------------------------------------------


def planned(groups: list[dict[str, torch.Tensor]], guessed: dict[str, tuple[int, ...]] | None = None) -> list[dict]:
    """The plan of ``groups``: every tensor's tag and shape, or for the keys in ``guessed`` that shape, inexact."""
    guessed = guessed or {}
    return [
        {
            k: Planned(writer_module._TAGS[t.dtype], guessed.get(k, tuple(t.shape)), exact=k not in guessed)
            for k, t in g.items()
        }
        for g in groups
    ]


def layers_with_blobs(n: int, blob_sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """n 4-bit-like layers whose JSON blobs have the given lengths (what a guess must be corrected to), a bias each
    second layer, and plain tensors of other dtypes between them."""
    groups = []
    for i in range(n):
        g = layer(f"blocks.{i}", 40 + 8 * i)
        g[f"blocks.{i}.weight.quant_state.bitsandbytes__nf4"] = torch.randint(
            0, 256, (blob_sizes[i],), dtype=torch.uint8
        )
        if i % 2:
            g[f"blocks.{i}.bias"] = torch.randn(7).bfloat16()
        groups.append(g)
        groups.append({f"norm{i}.weight": torch.randn(5 + i).half()})
    return groups


def write_planned(folder: Path, groups, plan, order, max_shard_size=10**10) -> list[Path]:
    with ShardedWriter(folder, "model", max_shard_size, plan=plan) as w:
        for i in order:
            w.add_group(groups[i])
    return w.close()


ORDERS = {
    "plan": lambda n: list(range(n)),
    "reversed": lambda n: list(range(n))[::-1],
    "shuffled": lambda n: random.Random(0).sample(range(n), n),
}


@pytest.mark.parametrize("max_shard_size", [10**10, 700, 333], ids=["one-shard", "shards", "small-shards"])
@pytest.mark.parametrize("guess", ["none", "right", "wrong", "some-right"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_a_planned_writer_writes_what_an_unplanned_one_writes(tmp_path, order, guess, max_shard_size):
    """Whatever order the planned groups arrive in, and whether the guessed blob lengths were right or not, every
    file equals what the writer writes without a plan, groups added in plan order (i.e. save_pretrained's)."""
    blob_sizes = [17 + (i * 5) % 9 for i in range(6)]
    groups = layers_with_blobs(6, blob_sizes)
    blobs = {k: t.shape for g in groups for k, t in g.items() if "quant_state" in k}
    right = {k for i, k in enumerate(blobs) if guess == "right" or (guess == "some-right" and i % 2)}
    guessed = {} if guess == "none" else {k: (s[0] if k in right else 20,) for k, s in blobs.items()}
    expected = write(tmp_path / "unplanned", groups, max_shard_size)
    files = write_planned(tmp_path / "planned", groups, planned(groups, guessed), ORDERS[order](len(groups)),
                          max_shard_size)  # fmt: skip
    assert [f.name for f in files] == [f.name for f in expected]
    for ours, theirs in zip(files, expected, strict=True):
        assert ours.read_bytes() == theirs.read_bytes(), ours.name
    assert sorted(os.listdir(tmp_path / "planned")) == sorted(f.name for f in files)  # no spool or part left


def test_groups_in_layout_order_are_each_written_once_in_place(tmp_path, monkeypatch):
    """Groups arriving in save_file's order (by key) with guessed blob lengths: nothing waits in a spool and nothing
    is copied at close: each byte is written once."""
    groups = layers_with_blobs(6, [19, 20, 18, 20, 21, 20])  # some guesses right, some wrong
    plan = planned(groups, {k: (20,) for g in groups for k in g if "quant_state" in k})
    copies = []
    real = writer_module._copy_range
    monkeypatch.setattr(writer_module, "_copy_range", lambda *a: copies.append(a) or real(*a))
    order = sorted(range(len(groups)), key=lambda i: min(groups[i]))
    spools = []
    with ShardedWriter(tmp_path / "out", "model", 10**10, plan=plan) as w:
        for i in order:
            w.add_group(groups[i])
            spools += [p for p in os.listdir(tmp_path / "out") if p.endswith(".spool")]
    w.close()
    assert copies == [] and spools == []
    expected = write(tmp_path / "ref", groups)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == expected[0].read_bytes()


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("change", ["missing-group", "missing-key", "other-shape", "other-dtype"])
def test_what_differs_from_the_plan_is_written_as_it_arrived(tmp_path, change, order):
    """A group never added, a key left out of its group, a tensor of another shape or dtype than planned: the files
    are those of what arrived (re-laid out at close), as an unplanned writer makes them."""
    groups = layers_with_blobs(4, [20, 20, 20, 20])
    plan = planned(groups, {k: (20,) for g in groups for k in g if "quant_state" in k})
    actual = [dict(g) for g in groups]
    if change == "missing-group":
        del actual[3]
    elif change == "missing-key":
        del actual[2]["blocks.1.weight.absmax"]
    elif change == "other-shape":
        actual[0]["blocks.0.weight.quant_map"] = torch.randn(7)
    else:
        actual[4]["blocks.2.weight.quant_map"] = actual[4]["blocks.2.weight.quant_map"].double()
    expected = write(tmp_path / "ref", actual)
    files = write_planned(tmp_path / "out", actual, plan, ORDERS[order](len(actual)))
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in expected]
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]


def test_a_plan_refuses_keys_it_does_not_hold_and_groups_it_splits(tmp_path):
    groups = [{"a": torch.randn(2), "b": torch.randn(2)}, {"c": torch.randn(2)}]
    w = ShardedWriter(tmp_path, "model", 1000, plan=planned(groups))
    with pytest.raises(ValueError, match="not in the writer's plan"):
        w.add_group({"z": torch.randn(2)})
    with pytest.raises(ValueError, match="different groups of the plan"):
        w.add_group({"a": torch.randn(2), "c": torch.randn(2)})
    w.add_group(groups[1])
    with pytest.raises(ValueError, match="already added"):
        w.add_group(groups[1])
    with pytest.raises(ValueError, match="repeated key"):
        ShardedWriter(tmp_path / "x", "model", 1000, plan=[{"a": Planned("F32", (1,))}, {"a": Planned("F32", (1,))}])


def test_a_planned_writer_aborted_midway_leaves_nothing(tmp_path):
    (tmp_path / "README.md").write_text("not ours")
    groups = layers_with_blobs(4, [20, 21, 22, 23])
    plan = planned(groups, {k: (20,) for g in groups for k in g if "quant_state" in k})
    w = ShardedWriter(tmp_path, "model", 10**10, plan=plan)
    for g in groups[::-1][:5]:  # out of order: parts and spools both exist
        w.add_group(g)
    assert any(p.endswith(".spool") for p in os.listdir(tmp_path))
    w.abort()
    assert os.listdir(tmp_path) == ["README.md"]


@pytest.mark.parametrize("seed", range(25))
def test_random_plans_orders_and_guesses_write_what_an_unplanned_writer_writes(tmp_path, seed):
    """Random groups of mixed dtypes and sizes, random guesses (right or wrong) of some sizes, groups sometimes left
    out or changed, arriving in a random order, random shard limits: always the unplanned writer's bytes."""
    rng = random.Random(seed)
    dtypes = [torch.uint8, torch.bfloat16, torch.float32, torch.int8, torch.float16]
    groups = []
    for g in range(rng.randint(1, 12)):
        groups.append({
            f"m{rng.randint(0, 99):02d}.{g}.{name}": torch.randint(0, 100, (rng.randint(0, 40),)).to(rng.choice(dtypes))
            for name in rng.sample(["weight", "weight.absmax", "weight.quant_state", "bias", "SCB"], rng.randint(1, 4))
        })  # fmt: skip
    guessed = {k: (max(0, t.shape[0] + rng.choice([-3, 0, 0, 2])),) for g in groups for k, t in g.items()
               if t.dtype == torch.uint8 and rng.random() < 0.5}  # fmt: skip
    plan = planned(groups, guessed)
    actual = [dict(g) for g in groups]
    if rng.random() < 0.3:
        del actual[rng.randrange(len(actual))]
    if actual and rng.random() < 0.2:
        g = rng.choice(actual)
        key = rng.choice(list(g))
        g[key] = torch.zeros(3, dtype=torch.float64)
    actual = [g for g in actual if g]
    if not actual:
        return
    limit = rng.choice([10**9, 200, 120, 64])
    expected = write(tmp_path / "ref", actual, limit)
    files = write_planned(tmp_path / "out", actual, plan, rng.sample(range(len(actual)), len(actual)), limit)
    assert [f.name for f in files] == [f.name for f in expected]
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in expected]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f.name for f in files)

"""Generate a tiny, randomly initialised diffusers pipeline folder shaped like black-forest-labs/FLUX.1-dev.

The folder has FLUX.1-dev's diffusers layout (model_index.json plus scheduler/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/, transformer/ and vae/), and its weights come from the real classes
(FluxTransformer2DModel, T5EncoderModel, CLIPTextModel, AutoencoderKL), so every tensor name is a real FLUX name.
Only the widths and depths are shrunk. It is qtool's shipped example and a test fixture: every nn.Linear is a
multiple of 64 wide on both sides so that the bitsandbytes CPU kernels accept it, and the transformer and T5
encoder are sharded like the real checkpoint so that the sharded-checkpoint code paths get exercised.

Nothing is downloaded: the two tokenizers are built here from a small built-in caption corpus.

    python examples/make_tiny_flux.py OUTPUT_DIR [--seed 0] [--dtype bf16] [--overwrite]

The output is byte-for-byte reproducible for a given seed, dtype and set of library versions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

# diffusers imports bitsandbytes when it is installed, and bnb 0.50 warns about an optional CPU kernel package that
# nothing here uses; silence that logger before the import.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# bitsandbytes' CPU 4-bit / 8-bit kernels want both Linear dimensions to be multiples of its 64-element block.
LINEAR_MULTIPLE = 64

# FLUX.1-dev ships its transformer in 3 shards and its T5 encoder in 2; keep those counts.
SHARDS = {"transformer": 3, "text_encoder_2": 2}

# Tiny widths that keep FLUX.1-dev's ratios where they can (T5 d_ff = 2.5 x d_model, CLIP MLP = 4 x hidden,
# head_dim 64 in the text encoders, RoPE axes split like (16, 56, 56)).
T5_D_MODEL = 128
CLIP_HIDDEN = 64
T5_EXTRA_IDS = 100  # T5's <extra_id_N> sentinels, as in every T5 tokenizer

# Training text for both tokenizers, whose vocabularies (and so the text encoders' vocab_size) follow from it. Every
# word here is a single token in both; other words fall back to smaller pieces, never to an unknown token for ASCII.
CORPUS = """
a cat holding a sign that says hello world
a dog sitting on a red chair in a sunny garden
a photo of a small house near a lake at sunset
an astronaut riding a horse on the moon
a bowl of fruit on a wooden table, oil painting
a portrait of an old man with a long white beard
a city street at night with neon lights and rain
a mountain landscape with snow and a blue sky
a robot reading a book in a quiet library
a girl wearing a yellow dress walking on the beach
a cup of coffee next to a laptop on a desk
a forest path covered in autumn leaves
a close up photo of a green frog on a leaf
a castle on a hill under a cloudy sky
a bird flying over the ocean at sunrise
a black and white photo of a vintage car
a bicycle leaning against a brick wall
a plate of pasta with tomato sauce and basil
a cartoon drawing of a happy orange fox
a watercolor painting of flowers in a glass vase
a large ship sailing through a stormy sea
two children playing with a ball in the park
a man holding an umbrella in the snow
a woman smiling at the camera, studio lighting
a field of purple flowers under the stars
a train crossing a bridge over a river
a hand holding a glowing crystal
a sign that says open on a shop door
a cat sleeping on a soft pillow next to a window
a dog running through the grass with a stick
a cozy kitchen with a pot of soup on the stove
a futuristic city with flying cars and tall towers
a detailed pencil sketch of a lion
a sculpture made of ice in a frozen hall
the word flux written in bold letters, 4k, high quality, sharp focus
"""

# The 188 printable byte values keep their own character in byte-level BPE; the other 68 bytes (controls, space,
# soft hyphen, ...) are moved to code points 256 and up so that every byte has a visible, non-space symbol.
PRINTABLE_BYTES = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in the order CLIP's vocabulary lists them (printable bytes first)."""
    shifted = [b for b in range(256) if b not in PRINTABLE_BYTES]
    return [chr(b) for b in PRINTABLE_BYTES] + [chr(256 + i) for i in range(len(shifted))]


def corpus_words() -> Counter[str]:
    """Word frequencies of the corpus, split roughly like CLIP's pre-tokenizer does for lowercase ASCII."""
    return Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", CORPUS.lower()))


def learn_bpe_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges, CLIP style ("</w>" marks a word's last symbol), until every word is one token.

    Ties between equally frequent pairs go to the lexicographically smallest pair so the result is deterministic.
    """
    segmented = {(*word[:-1], word[-1] + "</w>"): count for word, count in words.items()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in segmented.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        segmented = {merge_pair(symbols, best): count for symbols, count in segmented.items()}


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of pair in symbols, left to right, with the joined symbol."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def special_token_entry(content: str, normalized: bool) -> dict[str, object]:
    """One token in the form tokenizer_config.json / special_tokens_map.json use for special tokens."""
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_tokenizer(folder: Path) -> int:
    """Write the CLIP BPE tokenizer files FLUX.1-dev has in tokenizer/, and return its vocabulary size.

    CLIP's vocabulary is: byte symbols, byte symbols + "</w>", one token per merge, <|startoftext|>, <|endoftext|>.
    The end-of-text token having the largest id matters: CLIPTextModel configs with eos_token_id 2 (FLUX.1-dev's)
    pool the hidden state at the argmax of the input ids.
    """
    folder.mkdir(parents=True)
    base = byte_symbols()
    base += [symbol + "</w>" for symbol in base]
    merges = learn_bpe_merges(corpus_words())
    # Two merge paths can build the same token ("ab"+"c", "a"+"bc"); it gets one id, at its first merge.
    tokens = base + list(dict.fromkeys(a + b for a, b in merges)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}

    write_json(folder / "vocab.json", vocab)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    bos = special_token_entry("<|startoftext|>", normalized=True)
    eos = special_token_entry("<|endoftext|>", normalized=False)
    write_json(
        folder / "special_tokens_map.json",
        {"bos_token": bos, "eos_token": eos, "pad_token": "<|endoftext|>", "unk_token": eos},
    )
    write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(vocab["<|startoftext|>"]): {**bos, "special": True},
                str(vocab["<|endoftext|>"]): {**eos, "special": True},
            },
            "bos_token": "<|startoftext|>",
            # FLUX.1-dev says true, which transformers 5 ignores (with a warning) for BPE tokenizers as it would
            # corrupt decoded text; false gives the same tokens without the warning on every pipeline load.
            "clean_up_tokenization_spaces": False,
            "do_lower_case": True,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>",
        },
    )
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    """Write a T5-style Unigram tokenizer (tokenizer.json and configs) to tokenizer_2/; return its vocabulary size.

    The layout follows T5's: <pad>=0, </s>=1, <unk>=2, the pieces, then <extra_id_99> ... <extra_id_0>. Pieces are
    "▁word" for every corpus word, scored by frequency, plus "▁" and single characters at a low score as fallback.
    Real T5 normalizes with a compiled SentencePiece charmap; NFKC plus space squeezing is the nearest portable
    equivalent.
    """
    folder.mkdir(parents=True)
    words = corpus_words()
    total = sum(words.values())
    fallback_score = math.log(1 / total) - 10.0
    pieces = [("▁" + word, math.log(count / total)) for word, count in sorted(words.items())]
    pieces.append(("▁", fallback_score))
    pieces += [(chr(c), fallback_score) for c in range(0x21, 0x7F)]
    specials = ["<pad>", "</s>", "<unk>"]
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(T5_EXTRA_IDS))]
    vocab = [(token, 0.0) for token in specials] + pieces + [(token, 0.0) for token in sentinels]

    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in specials + sentinels])
    tokenizer.save(str(folder / "tokenizer.json"))

    entries = {token: special_token_entry(token, normalized=False) for token in specials}
    write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": sentinels[::-1],
            "eos_token": entries["</s>"],
            "pad_token": entries["<pad>"],
            "unk_token": entries["<unk>"],
        },
    )
    special_ids = [*range(len(specials)), *range(len(vocab) - T5_EXTRA_IDS, len(vocab))]
    write_json(
        folder / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(i): {**special_token_entry(vocab[i][0], normalized=False), "special": True} for i in special_ids
            },
            "additional_special_tokens": sentinels[::-1],
            "clean_up_tokenization_spaces": True,
            "eos_token": "</s>",
            "extra_ids": T5_EXTRA_IDS,
            "legacy": True,
            "model_max_length": 512,
            "pad_token": "<pad>",
            "tokenizer_class": "T5Tokenizer",
            "unk_token": "<unk>",
        },
    )
    return len(vocab)


def check_tokenizers(folder: Path) -> None:
    """Load both tokenizers the way FluxPipeline does and check they encode a prompt without unknown tokens."""
    for tokenizer in (
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        T5TokenizerFast.from_pretrained(folder / "tokenizer_2"),
    ):
        # Without the special tokens, because CLIP's unknown token is its end-of-text token.
        ids = tokenizer("a cat holding a sign", add_special_tokens=False).input_ids
        if tokenizer.unk_token_id in ids:
            raise AssertionError(f"{type(tokenizer).__name__} encodes the test prompt as {ids}")


def seeded(seed: int, component: str) -> None:
    """Seed torch's global RNG (which the model constructors initialise weights from) per component.

    Deriving the seed from the component name keeps each component's weights independent of the others, so
    changing one component's config does not change the bytes of the rest.
    """
    torch.manual_seed(zlib.crc32(f"{seed}/{component}".encode()))


def build_models(seed: int, clip_vocab_size: int, t5_vocab_size: int) -> dict[str, torch.nn.Module]:
    """Construct the four networks with FLUX.1-dev's configs, shrunk. Non-size settings are FLUX.1-dev's."""
    seeded(seed, "text_encoder")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab_size,
            hidden_size=CLIP_HIDDEN,
            intermediate_size=4 * CLIP_HIDDEN,
            projection_dim=CLIP_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=CLIP_HIDDEN // 64,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            # FLUX.1-dev's (legacy) ids: eos_token_id 2 makes CLIP pool at the highest token id, i.e. <|endoftext|>.
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )

    seeded(seed, "text_encoder_2")
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab_size,
            d_model=T5_D_MODEL,
            d_kv=64,
            d_ff=T5_D_MODEL * 5 // 2,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=T5_D_MODEL // 64,
            # T5 v1.1: gated-GELU feed-forward, and tie_word_embeddings=False, which v1.1 configs use to mean "no
            # output rescaling" (transformers 5 writes it as scale_decoder_outputs=false, tie_word_embeddings=true).
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            layer_norm_epsilon=1e-6,
            dropout_rate=0.1,
        )
    )

    seeded(seed, "transformer")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch, packed by FluxPipeline
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=(8, 28, 28),  # FLUX.1-dev's (16, 56, 56) halved; must sum to attention_head_dim
    )

    seeded(seed, "vae")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        # Four levels keep FLUX's 8x downsampling (FluxPipeline derives vae_scale_factor from this length); the
        # deepest level is 64 wide because its mid-block attention Linears take that width.
        block_out_channels=(32, 32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        force_upcast=True,
        mid_block_add_attention=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "transformer": transformer, "vae": vae}


def check_linear_widths(models: dict[str, torch.nn.Module]) -> int:
    """Fail unless every nn.Linear in every model is a multiple of LINEAR_MULTIPLE wide on both sides."""
    count = 0
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                count += 1
                if module.in_features % LINEAR_MULTIPLE or module.out_features % LINEAR_MULTIPLE:
                    raise AssertionError(
                        f"{component}.{name} is {module.in_features} -> {module.out_features}; "
                        f"both must be multiples of {LINEAR_MULTIPLE}"
                    )
    return count


def max_shard_bytes(model: torch.nn.Module, shards: int) -> int:
    """A max_shard_size for which save_pretrained's greedy packing writes exactly `shards` files.

    total / (shards - 0.5) is too small for shards - 1 files, and leaves the last file room for what the greedy
    packing wastes at the end of each earlier file (at most one tensor each, and every tensor here is small).
    """
    # parameters() lists tied tensors (T5's shared / encoder.embed_tokens) once, as save_pretrained stores them.
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return math.ceil(total / (shards - 0.5))


def count_shards(folder: Path) -> int:
    """The number of safetensors files listed in the folder's shard index (0 when it is not sharded)."""
    indexes = list(folder.glob("*.safetensors.index.json"))
    if not indexes:
        return 0
    return len(set(json.loads(indexes[0].read_text())["weight_map"].values()))


def write_pipeline(folder: Path, seed: int, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Write every component and model_index.json into folder, which must not exist yet."""
    folder.mkdir()
    clip_vocab_size = write_clip_tokenizer(folder / "tokenizer")
    t5_vocab_size = write_t5_tokenizer(folder / "tokenizer_2")
    check_tokenizers(folder)

    models = build_models(seed, clip_vocab_size, t5_vocab_size)
    check_linear_widths(models)
    for component, model in models.items():
        model.to(dtype)
        # A max_shard_size above the model size writes the single-file layout, as FLUX.1-dev has for these.
        shards = SHARDS.get(component, 1)
        size = max_shard_bytes(model, shards) if shards > 1 else "10GB"
        model.save_pretrained(folder / component, max_shard_size=size)
        if shards > 1 and count_shards(folder / component) != shards:
            raise AssertionError(f"{component} was written in {count_shards(folder / component)} shards, not {shards}")

    # FLUX.1-dev's flow-matching schedule, with resolution-dependent shift.
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(folder / "scheduler")

    # Written by hand because FluxPipeline.save_pretrained would re-save the tokenizers in the installed
    # transformers' own format rather than FLUX.1-dev's; the format matches what diffusers writes.
    model_index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return models


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="folder to create (must be empty or missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default: bf16)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT_DIR if it is a pipeline folder (has model_index.json) from an earlier run",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.output_dir
    if out.exists() and not out.is_dir():
        sys.exit(f"error: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            sys.exit(f"error: {out} is not empty; pass --overwrite to replace it")
        # --overwrite deletes the folder, so only accept something that looks like an earlier output.
        if not (out / "model_index.json").is_file():
            sys.exit(f"error: {out} has no model_index.json; refusing to delete a folder this script did not write")

    # The libraries' per-file progress bars and their advice about loading real checkpoints (e.g. "use torch_dtype
    # in from_pretrained instead of .to()") are noise for a generator whose output is one summary line.
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the destination and move into place at the end, so a failed run leaves nothing half-written.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-flux-", dir=out.parent))
    try:
        models = write_pipeline(staging / "pipeline", args.seed, DTYPES[args.dtype])
        if out.exists():
            shutil.rmtree(out)
        (staging / "pipeline").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    parts = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in counts.items())
    print(
        f"wrote {out}: {sum(counts.values()) / 1e6:.2f}M params ({parts}); "
        f"{check_linear_widths(models)} Linear layers, all multiples of {LINEAR_MULTIPLE}; "
        f"{folder_bytes(out) / 1e6:.1f} MB {args.dtype}; {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

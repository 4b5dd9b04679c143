"""Generate text with a bitsandbytes-quantized transformers causal LM run by qtool's own layers (no bitsandbytes).

    python examples/run_llm_qtool.py [CHECKPOINT] [--prompt "..."] [--max-new-tokens 16] [--device cuda] [--compile]

CHECKPOINT is a folder or Hub repo id quantized by ``qtool quantize`` (or by bnb's save_pretrained), e.g. after
``qtool quantize Qwen/Qwen2.5-0.5B --nf4 --double-quant --output qwen-nf4-dq``. Without one, a tiny random Llama is
made, saved and quantized (NF4 + double quant) in a temporary folder first: its "text" is random token ids, but every
step of the real path runs. Greedy decoding, so the output is deterministic.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import qtool


def tiny_llama(folder: Path) -> Path:
    """A 2-layer random Llama (bf16) saved to ``folder/src`` and quantized to ``folder/nf4-dq``; returns the latter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.api import quantize_checkpoint
    from qtool.spec import QuantSpec

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder / "src")
    return quantize_checkpoint(folder / "src", spec=QuantSpec(double_quant=True), output=folder / "nf4-dq").output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="folder or Hub repo id (default: a tiny random Llama)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default: {default_device}")
    parser.add_argument("--compile", action="store_true", help="torch.compile(model.forward, fullgraph=True)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qtool-llm-") as tmp:
        checkpoint = args.checkpoint or str(tiny_llama(Path(tmp)))
        start = time.perf_counter()
        model = qtool.load(checkpoint, device=args.device)
        loaded = time.perf_counter()

        tokenizer = None
        if args.checkpoint:
            from transformers import AutoTokenizer

            folder = checkpoint if Path(checkpoint).is_dir() else None
            tokenizer = AutoTokenizer.from_pretrained(folder or checkpoint)
            input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        else:
            input_ids = torch.tensor([[1, 2, 3, 4, 5]])
        if args.compile:
            model.forward = torch.compile(model.forward, fullgraph=True, backend=args.compile_backend)
        with torch.no_grad():
            output = model.generate(
                input_ids.to(args.device),
                attention_mask=torch.ones_like(input_ids).to(args.device),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
            )
        done = time.perf_counter()

    new = output[0, input_ids.shape[1] :]
    kinds = Counter(type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__)
    print("Linear layers: " + ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common()))
    print(tokenizer.decode(output[0], skip_special_tokens=True) if tokenizer else f"new tokens: {new.tolist()}")
    print(f"load {loaded - start:.1f} s, {len(new)} tokens {done - loaded:.1f} s on {args.device}")
    return 0 if len(new) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

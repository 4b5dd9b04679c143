"""QuantSpec: the quantization options of one run, validated in one place, and the quantization_config they give.

The config dict is what diffusers and transformers write for a ``BitsAndBytesConfig`` (13 keys, sorted when
serialized; ../shared/docs/bnb-format.md §3.1). On load, its ``load_in_4bit`` / ``load_in_8bit`` pick the
quantizer and ``llm_int8_skip_modules`` shapes the module replacement, so it must describe exactly what we wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qtool.errors import QtoolError

COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_THRESHOLD = 6.0


@dataclass(frozen=True)
class QuantSpec:
    """What to do to every quantized Linear weight.

    Attributes:
        bits: 4 (NF4/FP4 blockwise, QLoRA) or 8 (LLM.int8 row-wise).
        quant_type: "nf4" or "fp4" (4-bit).
        double_quant: quantize the 4-bit absmax too (bnb_4bit_use_double_quant).
        blocksize: 4-bit elements per absmax; bnb's loaders always write 64.
        compute_dtype: "bf16", "fp16" or "fp32": bnb_4bit_compute_dtype, the dtype Linear4bit computes in.
        skip: module names kept in 16-bit (llm_int8_skip_modules), matched as the loading library matches them.
        threshold: llm_int8_threshold, the outlier threshold LLM.int8 applies to activations at run time.
        scale_search: store, per 4-bit block or 8-bit row, the scale (at most its absmax) that minimizes its squared
            error instead of the absmax itself. The format is unchanged: bnb dequantizes it as its own output. Not
            part of quantization_config (loaders need not know).
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: str = "bf16"
    skip: tuple[str, ...] = field(default_factory=tuple)
    threshold: float = DEFAULT_THRESHOLD
    scale_search: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QtoolError(f"--bits must be 4 or 8, got {self.bits}")
        if self.quant_type not in ("nf4", "fp4"):
            raise QtoolError(f"quant type must be nf4 or fp4, got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QtoolError(f"--blocksize must be a power of two from 32 to 4096, got {self.blocksize}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise QtoolError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            # NaN or infinity would go into config.json, which JSON does not allow (strict parsers refuse it).
            raise QtoolError(
                f"--threshold must be a finite number >= 0, got {self.threshold}", hint="LLM.int8's default is 6.0"
            )
        if self.bits == 8 and (self.double_quant or self.quant_type != "nf4" or self.blocksize != 64):
            raise QtoolError(
                "--nf4/--fp4, --double-quant and --blocksize apply to 4-bit only",
                hint="drop them with --bits 8 (LLM.int8 is row-wise, with no blocks or code table)",
            )

    @property
    def label(self) -> str:
        """A short name for folders and tables: nf4, nf4-dq, fp4, int8."""
        if self.bits == 8:
            return "int8"
        return self.quant_type + ("-dq" if self.double_quant else "")

    def quantization_config(self) -> dict:
        """The ``quantization_config`` object of config.json, as diffusers / transformers write it."""
        four = self.bits == 4
        return {
            "_load_in_4bit": four,
            "_load_in_8bit": not four,
            # An 8-bit config keeps BitsAndBytesConfig's 4-bit defaults (float32, fp4, no double quant).
            "bnb_4bit_compute_dtype": COMPUTE_DTYPES[self.compute_dtype] if four else "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": list(self.skip) if self.skip else None,
            "llm_int8_threshold": float(self.threshold),
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "quant_method": "bitsandbytes",
        }

    @classmethod
    def from_quantization_config(cls, config: dict) -> QuantSpec:
        """Read the settings back from a bnb ``quantization_config`` (qtool's or anyone's)."""
        if config.get("quant_method") != "bitsandbytes":
            raise QtoolError(f"not a bitsandbytes quantization_config (quant_method {config.get('quant_method')!r})")
        four = bool(config.get("load_in_4bit") or config.get("_load_in_4bit"))
        by_name = {v: k for k, v in COMPUTE_DTYPES.items()}
        skip = config.get("llm_int8_skip_modules") or []
        return cls(
            bits=4 if four else 8,
            quant_type=config.get("bnb_4bit_quant_type", "fp4") if four else "nf4",
            double_quant=bool(config.get("bnb_4bit_use_double_quant")) if four else False,
            compute_dtype=by_name.get(config.get("bnb_4bit_compute_dtype", "float32"), "fp32"),
            skip=tuple(skip) if isinstance(skip, list) else (skip,),
            threshold=float(config.get("llm_int8_threshold", DEFAULT_THRESHOLD)),
        )

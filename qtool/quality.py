"""How close each quantized layer is to its source weight, and the same per component: the figures of `qtool
quantize`'s summary, ``--json``, ``--report``, ``qtool.json`` and `qtool footprint`.

The figures come from the sums ``qtool.verify.layer_stats`` takes on the device during the streaming pass (no second
read of the weights). For a layer with source weight ``W`` and dequantized weight ``Q`` (``n`` elements):

- ``sqnr_db``: 10 log10(sum W^2 / sum (W - Q)^2), the signal-to-quantization-noise ratio in dB (higher is better;
  NF4 on N(0, 1) weights ~20.7 dB, int8 ~42.6 dB).
- ``rel_fro``: ||W - Q||_F / ||W||_F, the relative Frobenius error (10^(-sqnr_db / 20)).
- ``max_abs_err``: max |W - Q|, in the weight's units.
- ``extreme_share``: the share of the ``n`` weights stored as an extreme code, the one its block's absmax (4-bit:
  NF4 -1/+1, FP4 +-1) or its row's SCB (int8: +-127) restores to: each block's or row's largest weight, and those
  within half a code step of it. Scales chosen below the absmax (scale search) clip more weights to it.

Edge cases, each a layer ``status``: "zero" (an all-zero weight: no signal, so no SQNR nor relative error; it is
stored exactly), "exact" (no error: SQNR infinite, relative error 0), "nonfinite" (the weight held NaN or Inf, kept
with --allow-nonfinite: its sums are not numbers, and it is left out of the component's figures but for the count
``layers_nonfinite``), otherwise "ok". In JSON a figure that is not a finite number (an infinite SQNR included) is
``null``, with the layer's status saying why; figures are rounded to 6 significant digits there.

``aggregate`` is the one function that turns a component's layers into its figures, wherever they are shown.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Significant digits of a figure in JSON: far more than a measurement of quantization error means, and few enough
# that the float64 sums' order (the CPU's and the GPU's differ in the last bits) practically never shows.
DIGITS = 6


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise) from the sums of squares of the weight and of the error: None for an all-zero weight
    (signal 0), inf for an exact one (noise 0), NaN where a sum is NaN (non-finite weights)."""
    if signal == 0:
        return None
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal == signal and noise == noise else math.nan


def rel_fro(signal: float, noise: float) -> float | None:
    """sqrt(noise / signal): None for an all-zero weight (signal 0), NaN where a sum is not finite."""
    if signal == 0:
        return None
    return math.sqrt(noise / signal) if math.isfinite(signal) and math.isfinite(noise) else math.nan


def _json(x: float | None) -> float | None:
    """A figure as JSON holds it: None unless a finite number, else rounded to DIGITS significant digits."""
    return float(f"{x:.{DIGITS}g}") if x is not None and math.isfinite(x) else None


@dataclass(frozen=True)
class LayerQuality:
    """One quantized layer's figures (module docstring), from the sums ``layer_stats`` took.

    Attributes:
        key: the weight's state-dict key within its component, e.g. ``transformer_blocks.0.attn.to_q.weight``.
        shape: the weight's shape, [N, K].
        method: the method's label: nf4, nf4-dq, fp4, fp4-dq or int8.
        elements: the weight's number of elements.
        extreme: how many of them were stored as an extreme code.
        signal: sum W^2 (float64, of the float32 weight).
        noise: sum (W - Q)^2.
        max_abs_err: max |W - Q| over the elements whose error is a number.
        nonfinite: the weight held NaN or Inf (or, for int8, values beyond float16's range).
    """

    key: str
    shape: tuple[int, ...]
    method: str
    elements: int
    extreme: int
    signal: float
    noise: float
    max_abs_err: float
    nonfinite: bool = False

    @property
    def status(self) -> str:
        """ "nonfinite", "zero", "exact" or "ok" (module docstring)."""
        if self.nonfinite or not (math.isfinite(self.signal) and math.isfinite(self.noise)):
            return "nonfinite"
        if self.signal == 0:
            return "zero"
        return "exact" if self.noise == 0 else "ok"

    @property
    def sqnr_db(self) -> float | None:
        return sqnr_db(self.signal, self.noise)

    @property
    def rel_fro(self) -> float | None:
        return rel_fro(self.signal, self.noise)

    @property
    def extreme_share(self) -> float | None:
        return self.extreme / self.elements if self.elements else None

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "shape": list(self.shape),
            "method": self.method,
            "status": self.status,
            "sqnr_db": _json(self.sqnr_db),
            "rel_fro": _json(self.rel_fro),
            "max_abs_err": _json(self.max_abs_err),
            "extreme_share": _json(self.extreme_share),
            "elements": self.elements,
            "extreme": self.extreme,
            "signal": _json(self.signal),
            "noise": _json(self.noise),
        }


# The figures of a component, in their JSON order.
COMPONENT_FIGURES = (
    "layers", "layers_nonfinite", "sqnr_mean_db", "sqnr_min_db", "sqnr_db", "rel_fro", "max_abs_err", "extreme_share",
)  # fmt: skip


@dataclass(frozen=True)
class ComponentQuality:
    """A component's figures over its quantized layers (``aggregate``). None where no layer gives one.

    Attributes:
        layers: quantized layers.
        layers_nonfinite: of those, the ones whose weight held NaN or Inf, left out of every figure below.
        sqnr_mean_db, sqnr_min_db: the mean and the least of the layers' SQNR, over the layers whose SQNR is a
            finite number (not the exact and all-zero ones).
        sqnr_db: the component's SQNR as one tensor: 10 log10(sum of every signal / sum of every noise), so large
            layers weigh more; inf if every layer is exact.
        rel_fro: sqrt(sum of every noise / sum of every signal).
        max_abs_err: the largest error of any element.
        extreme_share: sum of the extreme counts / sum of the elements.
    """

    layers: int
    layers_nonfinite: int = 0
    sqnr_mean_db: float | None = None
    sqnr_min_db: float | None = None
    sqnr_db: float | None = None
    rel_fro: float | None = None
    max_abs_err: float | None = None
    extreme_share: float | None = None

    def to_dict(self) -> dict:
        return {
            name: getattr(self, name) if name.startswith("layers") else _json(getattr(self, name))
            for name in COMPONENT_FIGURES
        }

    @classmethod
    def from_dict(cls, data: dict) -> ComponentQuality:
        """Read ``to_dict``'s output back (e.g. from qtool.json).

        Raises:
            ValueError: not such a dict (a missing key, a wrong type).
        """
        if not isinstance(data, dict) or set(data) != set(COMPONENT_FIGURES):
            raise ValueError(f"not a component's quality figures: {data!r}")
        values = {}
        for name in COMPONENT_FIGURES:
            value = data[name]
            if name.startswith("layers"):
                ok = type(value) is int and value >= 0
            else:
                ok = value is None or (type(value) in (int, float) and math.isfinite(value))
            if not ok:
                raise ValueError(f"quality figure {name} is {value!r}")
            values[name] = value if value is None or name.startswith("layers") else float(value)
        return cls(**values)


def aggregate(layers: Iterable[LayerQuality]) -> ComponentQuality | None:
    """A component's figures from its layers' (``ComponentQuality``); None for no layer at all."""
    layers = list(layers)
    if not layers:
        return None
    measured = [q for q in layers if q.status != "nonfinite"]
    sqnrs = [s for q in measured if (s := q.sqnr_db) is not None and math.isfinite(s)]
    signal = math.fsum(q.signal for q in measured)
    noise = math.fsum(q.noise for q in measured)
    elements = sum(q.elements for q in measured)
    return ComponentQuality(
        layers=len(layers),
        layers_nonfinite=len(layers) - len(measured),
        sqnr_mean_db=math.fsum(sqnrs) / len(sqnrs) if sqnrs else None,
        sqnr_min_db=min(sqnrs, default=None),
        sqnr_db=sqnr_db(signal, noise) if measured else None,
        rel_fro=rel_fro(signal, noise) if measured else None,
        max_abs_err=max((q.max_abs_err for q in measured), default=None),
        extreme_share=sum(q.extreme for q in measured) / elements if elements else None,
    )


def worst(layers: Iterable[LayerQuality], n: int = 3) -> list[LayerQuality]:
    """The ``n`` layers of lowest finite SQNR, lowest first (the summary's "worst layers")."""
    ranked = [q for q in layers if q.sqnr_db is not None and math.isfinite(q.sqnr_db)]
    return sorted(ranked, key=lambda q: q.sqnr_db)[:n]

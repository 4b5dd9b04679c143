"""A size budget (``--max-size``, ``--max-vram``): per layer 4-bit, 8-bit or 16-bit, the least error that fits.

What loads (diffusers 0.42.1, transformers 5.x, bitsandbytes 0.50.2, read in the installed sources):

- **One component cannot mix 4-bit and 8-bit layers.** A model's config.json has one ``quantization_config``, and
  from_pretrained builds one quantizer from it: ``load_in_4bit`` or ``load_in_8bit`` picks the class
  (transformers quantizers/auto.py:164-166 and 211-217; diffusers quantizers/auto.py:82-83 and 110-113; one per
  model: transformers quantizers/auto.py:365, diffusers models/modeling_utils.py:1191). ``BitsAndBytesConfig``
  refuses both flags at once (transformers utils/quantization_config.py:456-457, diffusers
  quantizers/quantization_config.py:244). Module replacement then turns every Linear it converts into the same
  class with the same options: ``Linear8bitLt`` if the method is ``llm_int8``, else ``Linear4bit`` with the one
  quant_type, double quant and compute dtype (transformers integrations/bitsandbytes.py:195-216, diffusers
  quantizers/bitsandbytes/utils.py:68-95). A layer stored in the other width fails or loads wrong: diffusers
  4-bit wants each weight's ``quant_state.bitsandbytes__*`` blob (bnb_quantizer.py:173-177), and the loaders
  only treat weights of their own class as quantized (transformers quantizer_bnb_4bit.py:87,
  quantizer_bnb_8bit.py:111). Tried on a T5 encoder (tests/test_budget.py): NF4 with one layer's entries in int8
  loads in transformers with only an "UNEXPECTED: SCB, weight_format" report, as a Linear4bit holding int8
  codes and no quant state, and its first forward fails ("FP4 quantization state not initialized"). So NF4 and
  FP4, or double quant on and off, cannot mix within a component either.
- **Different components can differ.** A pipeline loads each component with its own class's from_pretrained from
  its own folder, hence its own config.json (diffusers pipelines/pipeline_loading_utils.py:923), and diffusers'
  ``PipelineQuantizationConfig(quant_mapping=...)`` exists to give each component its own config
  (quantizers/pipe_quant_config.py:34-62). A transformer at 4-bit beside a T5 at 8-bit loads.
- **A layer stays 16-bit through ``llm_int8_skip_modules``**, matched by each library's own rule (plan.py's
  ``diffusers_keeps`` and ``transformers_keeps``: diffusers quantizers/bitsandbytes/utils.py:58-62, transformers
  quantizers/quantizers_utils.py:26-37). transformers adds its default skips (an LLM's lm_head, tied weights) only
  when the list is null (quantizers/base.py:265-274), so a list that adds names must name those layers too.
  tests/test_budget.py loads components quantized with long lists of full names, and every listed layer (and no
  other) comes back as a plain ``nn.Linear``.

So a choice is, per component: one bit width (4 with the run's 4-bit options, or 8) for its quantized layers, plus a
set of layers kept 16-bit by skip names. Names are full module names, written plainly (not regex-escaped: other
readers of ``llm_int8_skip_modules``, such as transformers 4.x, match names literally). Where a loader's rule makes
a name keep more than its own layer (diffusers keeps every Linear whose child name is ``proj_out`` when the list
holds the top-level ``proj_out``; transformers' suffix rule keeps ``vision_model.layers.0.fc1`` for
``model.layers.0.fc1``), the name is a *group*: choosing it keeps, and costs, all of them (``keep_groups``).

The objective is the sum over quantized layers of ``parameters x relative error``, where the relative error is
noise / signal = ||W - Q(W)||^2 / ||W||^2 = 10^(-SQNR/10), measured per layer (``measure_errors``); a 16-bit layer
adds 0. Why this sum: a layer's relative weight error is the relative error it adds to its output for inputs
without a preferred direction (E||dW x||^2 / E||W x||^2 = ||dW||^2 / ||W||^2), independent of the layer's scale
(which norms and residual paths make arbitrary); weighting by parameters counts it once per weight, i.e. in
proportion to the layer's share of the model's multiply-adds per token. Unweighted, a budget would go to the many
small layers whatever their error; weighted, 16-bit bytes (proportional to parameters) buy the layers of lowest
SQNR first. It is a proxy: it does not know how sensitive the output is to each layer.

The search (``choose``): each combination of per-component bit widths (two per component, so a handful), and for
each, the groups to keep 16-bit. Groups of several layers are few (one in FLUX), so every subset of them is tried
forced in with the others left out, which leaves a knapsack of disjoint layers; that is solved greedily by error
removed per extra byte (filling), again from the best single layer, and exactly by dynamic programming over the
slack in DP_STEPS steps (costs rounded up, so always within budget); one-for-one swaps and a fill polish each; the
best wins. The greedy alone is within one layer's error of the optimum and at least half its error reduction, but
misses by several times the optimum's (small) error when the budget is nearly everything; the DP closes that: on
800 random small cases it matches brute force in every one (tests/test_budget.py). Under 1 s on the CPU for a
pipeline of FLUX.1-dev's size (650 layers).

Bytes are per measure, as footprint predicts them: ``disk`` (tensor bytes written: ``--max-size``), ``memory``
(``get_memory_footprint()``) and ``gpu`` (memory plus the quant states bnb also puts on the GPU: the figure
footprint's ``--gpu-memory`` checks, and the honest one for ``--max-vram``). With double quant, disk bytes are
exact but for the length of each layer's offset repr (plan.TYPICAL_OFFSET): leave a few bytes per layer.

If even the smallest choice does not fit, ``choose`` raises a QtoolError with the smallest size reachable. If
everything fits unquantized it raises ``FitsUnquantized`` (a QtoolError): a checkpoint whose every layer is listed
as skipped is a plain checkpoint with a misleading config, and the user would rather know that nothing needs
quantizing (``qtool footprint`` can catch it and say so). A component whose layers all end up 16-bit while another
is quantized is reported with ``bits=None``: copy it as it is, with no quantization_config.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from qtool.errors import QtoolError
from qtool.plan import (
    ComponentPlan,
    diffusers_keeps,
    memory_bytes,
    packed_bytes,
    quantized_bytes,
    transformers_keeps,
)
from qtool.spec import QuantSpec

if TYPE_CHECKING:
    from qtool.io.reader import TensorReader

MEASURES = ("disk", "memory", "gpu")
BITS = (4, 8)
# One-for-one swap passes after the greedy fill; each pass that finds nothing ends the search.
SWAP_PASSES = 8
# Up to this many groups of several layers (names a loader over-matches; FLUX has one), every subset of them is
# tried forced in, the rest left out, so that each run is a knapsack of disjoint layers (2**4 runs at most).
MAX_FORCED = 4
# Capacity steps of the exact knapsack each run also solves (costs rounded up to slack / DP_STEPS bytes): a bool
# table of groups x steps (10 MB for FLUX.1-dev's ~500 layers), ~0.1 s per run.
DP_STEPS = 2**14
# Relative errors of N(0, 1) bf16 weights, from tests/helpers.py's SQNR means (blocksize 64): a stand-in for
# measured errors where no weight may be read (``nominal_errors``).
NOMINAL_SQNR_DB = {"nf4": 20.73, "fp4": 18.28, "int8": 42.59}
# Bytes a budget keeps back per double-quant layer: its quant-state blob holds the offset's repr, predicted as
# plan.TYPICAL_OFFSET (19 characters); a positive float32's repr takes at most 23 (e.g. 0.00012345678901234567).
OFFSET_MARGIN = 8


@dataclass(frozen=True)
class Budget:
    """A size budget for ``quantize_checkpoint(budget=...)`` and ``footprint(budget=...)``.

    Attributes:
        bytes: the budget, in bytes of ``measure``, for the whole output (every component, quantized or not).
        measure: "disk" (tensor bytes written: ``--max-size``), "gpu" (footprint's gpu figure: the loaded weights
            and the quant states bnb puts beside them: ``--max-vram``) or "memory" (``get_memory_footprint()``).
        bits: the widths a quantized component may take: (4, 8), or one of them.
    """

    bytes: int
    measure: str = "disk"
    bits: tuple[int, ...] = BITS

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {self.measure!r}")
        if not self.bits or not set(self.bits) <= set(BITS):
            raise ValueError(f"bits must be among {BITS}, got {self.bits}")
        if self.bytes <= 0:
            raise QtoolError(f"a budget must be more than 0 bytes, got {self.bytes}")

    @property
    def text(self) -> str:
        """E.g. "4.00 GB (disk)"."""
        return f"{human_size(self.bytes)} ({self.measure})"


class FitsUnquantized(QtoolError):
    """Everything fits the budget without quantizing: ``bytes`` is the size as stored, ``budget`` the budget."""

    def __init__(self, message: str, hint: str | None, nbytes: int, budget: int):
        super().__init__(message, hint)
        self.bytes = nbytes
        self.budget = budget


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


# --- what loads: one spec per component ------------------------------------------------------------------------


def spec_for_bits(spec: QuantSpec, bits: int, skip: tuple[str, ...] | None = None) -> QuantSpec:
    """The run's spec at ``bits``: 4-bit keeps its code type, double quant and blocksize; 8-bit drops them (QuantSpec
    refuses them with 8 bits). ``skip`` replaces the skip list if given."""
    skip = spec.skip if skip is None else tuple(skip)
    if bits == 4:
        return replace(spec, bits=4, skip=skip)
    if bits == 8:
        return replace(spec, bits=8, quant_type="nf4", double_quant=False, blocksize=64, skip=skip)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def quantize_options(spec: QuantSpec) -> dict:
    """``quantize_pending``'s keyword arguments for the spec's 4-bit method (``measure_errors``' ``options``); its
    8-bit pass keeps ``scale_search``."""
    options = {"quant_type": spec.quant_type, "double_quant": spec.double_quant, "blocksize": spec.blocksize}
    if spec.scale_search:
        options["scale_search"] = True
    return options


# --- skip names and the loaders' rules ----------------------------------------------------------------------------


def _rule(library: str) -> Callable[[str, list[str]], bool]:
    return diffusers_keeps if library == "diffusers" else transformers_keeps


def base_skip(plan: ComponentPlan, spec: QuantSpec) -> tuple[str, ...]:
    """The names a component's skip list must hold once the budget adds any: the run's ``--skip`` names, and for a
    transformers model without them, every Linear its default skips keep, by full name (a list, unlike null,
    replaces transformers' default skips: quantizers/base.py:265). ``_keep_in_fp32_modules`` (T5's ``wo``) needs
    nothing: both libraries add it to any list. Its Linears are named too in the second case (the plan does not
    tell them apart from the defaults), which is redundant but harmless."""
    names = list(spec.skip)
    if plan.library == "transformers" and not spec.skip:
        names += list(plan.kept_linears)
    return tuple(names)


def keep_groups(plan: ComponentPlan, spec: QuantSpec) -> dict[str, frozenset[str]]:
    """For each quantized layer (by full name, in plan order), the quantized layers its name keeps when it joins
    the component's skip list (``base_skip`` included), as the component's loader matches names: itself, and what
    the rule over-matches (the group the name stands for)."""
    keeps = _rule(plan.library)
    fqns = [layer.fqn for layer in plan.layers.values()]
    base = list(base_skip(plan, spec))
    # The rules match "any key", so a list keeps what each of its names keeps: base's part (normally nothing, as
    # the plan already applied it) is shared by every group.
    forced = frozenset(f for f in fqns if base and keeps(f, base))
    return {name: forced | {f for f in fqns if keeps(f, [name])} for name in fqns}


def _cover(groups: dict[str, frozenset[str]], wanted: frozenset[str], order: list[str]) -> list[str]:
    """Names whose groups together keep exactly ``wanted``, few of them, in ``order``; ValueError if impossible."""
    usable = {name: g for name, g in groups.items() if g <= wanted}
    covered = frozenset().union(*usable.values()) if usable else frozenset()
    if covered != wanted:
        missing = sorted(wanted - covered)
        extra = sorted(groups[missing[0]] - wanted) if missing[0] in groups else []
        raise ValueError(
            f"no skip list keeps exactly the wanted layers: {missing[0]} cannot be kept without "
            f"{', '.join(extra[:3]) or 'a layer the loader does not know'}"
        )
    rank = {n: i for i, n in enumerate(order)}
    chosen: list[str] = []
    cover: set[str] = set()
    # Largest groups first, so that a name the others' groups cover is left out.
    for name in sorted(usable, key=lambda n: (-len(usable[n]), rank.get(n, len(rank)), n)):
        if not usable[name] <= cover:
            chosen.append(name)
            cover |= usable[name]
    return sorted(chosen, key=lambda n: (rank.get(n, len(rank)), n))


def skip_names(plan: ComponentPlan, spec: QuantSpec, wanted: Iterable[str]) -> tuple[str, ...]:
    """The component's ``llm_int8_skip_modules`` that keeps 16-bit exactly ``wanted`` (full names of its quantized
    layers) beyond what it keeps already, as its loader matches names.

    ``wanted`` must be a union of ``keep_groups``: a name the rule over-matches brings its whole group, and a list
    that would keep a layer not wanted is refused (ValueError), never returned. With nothing wanted it is the run's
    own list (``spec.skip``), so that transformers' default skips stay in force as they were.
    """
    wanted = frozenset(wanted)
    if not wanted:
        return tuple(spec.skip)
    groups = keep_groups(plan, spec)
    unknown = sorted(wanted - set(groups))
    if unknown:
        raise ValueError(f"not quantized layers of {plan.name or plan.class_name}: {', '.join(unknown[:3])}")
    names = list(base_skip(plan, spec)) + _cover(groups, wanted, list(groups))
    keeps = _rule(plan.library)
    kept = {f for f in groups if keeps(f, names)}
    if kept != wanted:  # the groups say otherwise only if the rules stopped matching "any key"
        raise ValueError(f"the skip list would keep {sorted(kept ^ wanted)[:3]} against the choice")
    return tuple(dict.fromkeys(names))


# --- the costs ------------------------------------------------------------------------------------------------------


@dataclass
class LayerCost:
    """One quantizable layer: its parameters, its bytes at 4, 8 and 16 bits (the measure's), its relative errors
    (noise / signal) at 4 and 8 bits. ``math.inf`` marks a width the layer may not take (8-bit beyond float16)."""

    fqn: str
    params: int
    bytes: dict[int, int]
    error: dict[int, float]


@dataclass
class ComponentCosts:
    """What the search knows of one component. ``fixed``: bytes of everything but its quantizable layers' weights;
    ``groups``: skip name -> the layers it keeps (default: each layer alone); ``base_skip``: names its list carries
    once any is added; ``skip``: its list when none is (the run's ``--skip``); ``bits``: the widths it may take."""

    name: str
    library: str
    fixed: int
    layers: dict[str, LayerCost]
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    base_skip: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    bits: tuple[int, ...] = BITS
    measure: str = "disk"

    def __post_init__(self) -> None:
        if not self.groups:
            self.groups = {f: frozenset([f]) for f in self.layers}
        for name, group in self.groups.items():
            if not group or not group <= self.layers.keys():
                raise ValueError(f"{self.name}: group {name!r} keeps {sorted(group)[:3]}, not layers of the component")
        for layer in self.layers.values():
            for bits in self.bits:
                e = layer.error[bits]
                if not e >= 0:  # NaN too
                    raise ValueError(f"{self.name}/{layer.fqn}: relative error {e} at {bits}-bit")

    def size(self, bits: int | None, kept: Iterable[str] = ()) -> int:
        """Bytes with the layers at ``bits`` but ``kept`` at 16 (``bits`` None: all 16-bit, as stored)."""
        kept = set(kept)
        return self.fixed + sum(
            layer.bytes[16 if bits is None or f in kept else bits] for f, layer in self.layers.items()
        )

    def error(self, bits: int | None, kept: Iterable[str] = ()) -> float:
        """Sum of parameters x relative error of the layers not ``kept`` at ``bits``."""
        kept = set(kept)
        if bits is None:
            return 0.0
        return math.fsum(x.params * x.error[bits] for f, x in self.layers.items() if f not in kept)


def layer_bytes(plan: ComponentPlan, spec: QuantSpec, measure: str = "disk") -> tuple[int, dict[str, dict[int, int]]]:
    """``(fixed, {fqn: {4: b, 8: b, 16: b}})`` for one measure, by footprint's own arithmetic, so that the fixed
    bytes plus every layer at ``bits`` equals ``plan.bytes_after`` (disk), ``plan.memory_after`` (memory) or
    footprint's ``gpu_bytes`` (gpu) for the spec at ``bits``, and a layer at 16 counts as stored.

    disk: quantized_bytes (exact but for the double-quant offset's repr, see plan.TYPICAL_OFFSET); memory: the
    packed weight alone (bnb keeps the quant state beside the parameter); gpu: memory plus that quant state.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    specs = {bits: spec_for_bits(spec, bits) for bits in BITS}
    stored = plan.weights.tensors
    costs: dict[str, dict[int, int]] = {}
    if measure == "disk":
        fixed = sum(info.nbytes for key, info in stored.items() if key not in plan.layers)
    else:
        counted = {key: 0 for key in plan.layers if key in plan.model_tensors}
        fixed = memory_bytes(plan.model_tensors, stored, counted)
    for key, layer in plan.layers.items():
        sizes = {}
        for bits, s in specs.items():
            on_disk = quantized_bytes(layer.shape, s, layer.dtype)
            packed = packed_bytes(layer.shape, s) if key in plan.model_tensors else 0
            states = on_disk - packed_bytes(layer.shape, s)  # what bnb keeps beside the parameter
            sizes[bits] = {"disk": on_disk, "memory": packed, "gpu": packed + states}[measure]
        sizes[16] = stored[key].nbytes if measure == "disk" or key in plan.model_tensors else 0
        costs[layer.fqn] = sizes
    return fixed, costs


def component_costs(
    plan: ComponentPlan,
    spec: QuantSpec,
    errors: dict[str, dict[int, float]],
    measure: str = "disk",
    bits: tuple[int, ...] = BITS,
) -> ComponentCosts:
    """A planned component's costs for ``choose``: bytes by ``layer_bytes``, ``errors`` as ``measure_errors`` gives
    them ({fqn: {4: relative error, 8: relative error}}), groups by ``keep_groups``."""
    fixed, sizes = layer_bytes(plan, spec, measure)
    missing = [layer.fqn for layer in plan.layers.values() if layer.fqn not in errors]
    if missing:
        raise ValueError(f"no measured error for {', '.join(missing[:3])}")
    layers = {
        layer.fqn: LayerCost(layer.fqn, math.prod(layer.shape), sizes[layer.fqn], dict(errors[layer.fqn]))
        for layer in plan.layers.values()
    }
    return ComponentCosts(
        name=plan.name,
        library=plan.library,
        fixed=fixed,
        layers=layers,
        groups=keep_groups(plan, spec),
        base_skip=base_skip(plan, spec),
        skip=tuple(spec.skip),
        bits=tuple(bits),
        measure=measure,
    )


def nominal_errors(plan: ComponentPlan, spec: QuantSpec) -> dict[str, dict[int, float]]:
    """Each layer's relative error as for Gaussian weights (``NOMINAL_SQNR_DB``): what a choice can go on without
    reading weights (``qtool footprint``). It decides bit widths and sizes, not which layers: they are all alike."""
    e4 = 10 ** (-NOMINAL_SQNR_DB[spec.quant_type] / 10)
    e8 = 10 ** (-NOMINAL_SQNR_DB["int8"] / 10)
    return {layer.fqn: {4: e4, 8: e8} for layer in plan.layers.values()}


# --- the choice -----------------------------------------------------------------------------------------------------


@dataclass
class ComponentChoice:
    """One component's part of a choice. ``bits``: 4 or 8 for its quantized layers, None when every layer stays
    16-bit (copy the component unquantized); ``kept``: the layers kept 16-bit by ``skip`` (plan order); ``skip``:
    its whole ``llm_int8_skip_modules``; ``bytes`` in the choice's measure; ``error``: sum of params x relative
    error; ``params``: the parameters of its quantizable layers."""

    name: str
    bits: int | None
    kept: tuple[str, ...]
    skip: tuple[str, ...]
    bytes: int
    error: float
    params: int

    def spec(self, spec: QuantSpec) -> QuantSpec | None:
        """The QuantSpec that quantizes this component as chosen (None: leave it unquantized)."""
        return None if self.bits is None else spec_for_bits(spec, self.bits, self.skip)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "bits": self.bits,
            "kept_16bit": list(self.kept),
            "llm_int8_skip_modules": list(self.skip),
            "bytes": self.bytes,
            "error": self.error,
            "params": self.params,
        }


@dataclass
class Choice:
    """What a budget chooses. ``bytes``: the quantized components' and ``other_bytes`` (components copied as they
    are) together, in ``measure``; ``error``: the objective (module docstring)."""

    measure: str
    budget: int
    components: list[ComponentChoice]
    other_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.other_bytes + sum(c.bytes for c in self.components)

    @property
    def error(self) -> float:
        return math.fsum(c.error for c in self.components)

    @property
    def relative_error(self) -> float:
        """The parameter-weighted mean relative error of the quantizable layers (0 when all are 16-bit)."""
        params = sum(c.params for c in self.components)
        return self.error / params if params else 0.0

    def specs(self, spec: QuantSpec) -> dict[str, QuantSpec | None]:
        """{component: its QuantSpec, or None to copy it unquantized}, from the run's spec."""
        return {c.name: c.spec(spec) for c in self.components}

    def to_dict(self) -> dict:
        rel = self.relative_error
        return {
            "measure": self.measure,
            "budget_bytes": self.budget,
            "bytes": self.bytes,
            "other_bytes": self.other_bytes,
            "error": self.error,
            "relative_error": rel,
            "sqnr_db": 10 * math.log10(1 / rel) if rel > 0 else None,
            "components": [c.to_dict() for c in self.components],
        }


class _Knapsack:
    """The 16-bit groups to keep for fixed bit widths: every component's groups in one pool, layers numbered."""

    def __init__(self, comps: list[ComponentCosts], widths: tuple[int, ...]):
        self.index: dict[tuple[int, str], int] = {}
        self.gain: list[float] = []  # error removed by keeping the layer 16-bit
        self.cost: list[int] = []  # bytes it adds
        for ci, (c, bits) in enumerate(zip(comps, widths, strict=True)):
            for f, layer in c.layers.items():
                self.index[ci, f] = len(self.gain)
                self.gain.append(layer.params * layer.error[bits])
                self.cost.append(layer.bytes[16] - layer.bytes[bits])
        self.items = [(ci, name) for ci, c in enumerate(comps) for name in c.groups]
        self.layers = [tuple(self.index[ci, f] for f in comps[ci].groups[name]) for ci, name in self.items]
        self.users: list[list[int]] = [[] for _ in self.gain]
        for i, members in enumerate(self.layers):
            for layer in members:
                self.users[layer].append(i)
        self.alone = [self._sums(members) for members in self.layers]
        self.fixed: frozenset[int] = frozenset()  # groups a run keeps whatever (never swapped out)
        self.banned: frozenset[int] = frozenset()  # groups a run leaves out

    def _sums(self, members) -> tuple[float, int]:
        return math.fsum(self.gain[m] for m in members), sum(self.cost[m] for m in members)

    @staticmethod
    def _key(gain: float, cost: int, i: int) -> tuple:
        ratio = math.inf if cost <= 0 else gain / cost
        return (-ratio, -gain, i)

    def solve(self, slack: int) -> set[int]:
        """The best of one run per set of multi-layer groups taken (each such set forced in, the others left out,
        while there are at most MAX_FORCED of them): every run is then a knapsack of disjoint single layers."""
        multi = [i for i, members in enumerate(self.layers) if len(members) > 1]
        if len(multi) > MAX_FORCED:
            runs = [(frozenset(), frozenset())]  # too many to enumerate: they compete as any group does
        else:
            runs = [(frozenset(t), frozenset(multi) - set(t)) for r in range(len(multi) + 1)
                    for t in itertools.combinations(multi, r)]  # fmt: skip
        best: tuple[set[int], list[int]] | None = None
        for forced, banned in runs:
            if sum(self.cost[m] for m in {m for i in forced for m in self.layers[i]}) > slack:
                continue
            found = self._run(slack, forced, banned)
            if best is None or self._objective(found[1]) > self._objective(best[1]):
                best = found
        assert best is not None  # the run forcing nothing always fits
        return best[0]

    def _run(self, slack: int, forced: frozenset[int], banned: frozenset[int]) -> tuple[set[int], list[int]]:
        """Greedy by error removed per byte, filling; then the same from the best single group; swaps on both."""
        self.fixed, self.banned = forced, banned
        best = self._improve(*self._greedy(set(forced), slack))
        fits = [i for i, (g, c) in enumerate(self.alone) if c <= slack and g > 0 and i not in banned]
        if fits:
            single = max(fits, key=lambda i: (self.alone[i][0], -i))
            if single not in best[0]:
                other = self._greedy(set(forced) | {single}, slack)
                if other[2] >= 0:  # the single group fits beside the forced ones
                    other = self._improve(*other)
                    if self._objective(other[1]) > self._objective(best[1]):
                        best = other
        rest = [i for i in range(len(self.items)) if i not in forced and i not in banned]
        if len({m for i in rest for m in self.layers[i]}) == sum(len(self.layers[i]) for i in rest):  # disjoint
            other = self._improve(*self._fill(*self._dp(slack, forced, rest)))
            if self._objective(other[1]) > self._objective(best[1]):
                best = other
        return best

    def _dp(self, slack: int, forced: frozenset[int], rest: list[int]) -> tuple[set[int], list[int], int]:
        """The forced groups and the 0/1 knapsack optimum over ``rest`` (disjoint) with every cost rounded up to a
        unit of slack / DP_STEPS bytes: exact where the slack is at most DP_STEPS bytes, always within the budget."""
        import torch

        chosen: set[int] = set()
        count = [0] * len(self.gain)
        for i in forced:
            slack -= self._take(i, chosen, count)
        unit = max(1, -(-slack // DP_STEPS))
        capacity = slack // unit
        items = []
        for i in rest:
            g, c = self._sums([m for m in self.layers[i] if count[m] == 0])
            if g > 0 and c <= 0:
                slack -= self._take(i, chosen, count)  # frees bytes or costs none: always worth it
            elif g > 0 and c <= capacity * unit:
                items.append((i, g, -(-c // unit)))
        best = torch.zeros(capacity + 1, dtype=torch.float64)  # the most error removed within w units
        took = torch.zeros(len(items), capacity + 1, dtype=torch.bool)
        for k, (_, g, w) in enumerate(items):
            candidate = best[: capacity + 1 - w] + g
            better = candidate > best[w:]
            best[w:] = torch.where(better, candidate, best[w:])
            took[k, w:] = better
        w = capacity
        for k in reversed(range(len(items))):
            if took[k, w]:
                i, _, units = items[k]
                slack -= self._take(i, chosen, count)
                w -= units
        return chosen, count, slack

    def _objective(self, count: list[int]) -> float:
        return math.fsum(g for g, n in zip(self.gain, count, strict=True) if n)

    def _greedy(self, start: set[int], slack: int) -> tuple[set[int], list[int], int]:
        chosen: set[int] = set()
        count = [0] * len(self.gain)
        for i in start:
            slack -= self._take(i, chosen, count)
        return self._fill(chosen, count, slack)

    def _take(self, i: int, chosen: set[int], count: list[int]) -> int:
        new = [m for m in self.layers[i] if count[m] == 0]
        chosen.add(i)
        for m in self.layers[i]:
            count[m] += 1
        return sum(self.cost[m] for m in new)

    def _fill(self, chosen: set[int], count: list[int], slack: int) -> tuple[set[int], list[int], int]:
        """Take, while any fits, the group removing the most error per byte (marginal: layers already kept count
        neither way)."""
        version = [0] * len(self.items)
        heap = []
        for i in range(len(self.items)):
            if i not in chosen and i not in self.banned:
                g, c = self._sums([m for m in self.layers[i] if count[m] == 0])
                heap.append((*self._key(g, c, i), 0))
        heapq.heapify(heap)
        while heap:
            *_, i, v = heapq.heappop(heap)
            if v != version[i] or i in chosen:
                continue
            new = [m for m in self.layers[i] if count[m] == 0]
            g, c = self._sums(new)
            if not new or not g > 0 or c > slack:
                continue  # comes back only if a group it overlaps is taken (and it shrinks)
            slack -= self._take(i, chosen, count)
            for j in {j for m in new for j in self.users[m]} - chosen - self.banned:
                version[j] += 1
                g, c = self._sums([m for m in self.layers[j] if count[m] == 0])
                heapq.heappush(heap, (*self._key(g, c, j), version[j]))
        return chosen, count, slack

    def _improve(self, chosen: set[int], count: list[int], slack: int) -> tuple[set[int], list[int]]:
        """One-for-one swaps that remove more error within the budget, each followed by a fill; passes over the
        chosen groups until one swaps nothing (at most SWAP_PASSES)."""
        by_gain = sorted(range(len(self.items)), key=lambda i: -self.alone[i][0])
        for _ in range(SWAP_PASSES):
            swapped = False
            for i in sorted(chosen - self.fixed):
                if i not in chosen:  # swapped out earlier in this pass
                    continue
                lost = [m for m in self.layers[i] if count[m] == 1]
                g_lost, c_lost = self._sums(lost)
                lost_set = set(lost)
                best, best_gain = None, g_lost * (1 + 1e-12)
                for j in by_gain:
                    if self.alone[j][0] <= best_gain:
                        break  # a group removes at most its own error
                    if j in chosen or j in self.banned:
                        continue
                    g, c = self._sums([m for m in self.layers[j] if count[m] == 0 or m in lost_set])
                    if c <= slack + c_lost and g > best_gain:
                        best, best_gain = j, g
                if best is None:
                    continue
                chosen.discard(i)
                for m in self.layers[i]:
                    count[m] -= 1
                slack += c_lost
                slack -= self._take(best, chosen, count)
                chosen, count, slack = self._fill(chosen, count, slack)
                swapped = True
            if not swapped:
                break
        return chosen, count


def choose(components: list[ComponentCosts], budget: int, *, other_bytes: int = 0) -> Choice:
    """Per component a bit width and the layers to keep 16-bit, with the least total error that fits ``budget``.

    Args:
        components: the components to quantize (``component_costs``), all in one measure.
        budget: bytes in that measure, for everything: the components and ``other_bytes``.
        other_bytes: what else counts against the budget (pipeline components copied as they are).

    Returns:
        The Choice: per component its bits, 16-bit layers, skip list, bytes and error.

    Raises:
        QtoolError: when nothing fits (it says the smallest size reachable), or no choice avoids a layer that may
            not take its width (an infinite error); FitsUnquantized when nothing needs quantizing.
    """
    measures = {c.measure for c in components}
    if len(measures) > 1:
        raise ValueError(f"components priced in different measures: {sorted(measures)}")
    measure = measures.pop() if measures else "disk"
    stored = other_bytes + sum(c.size(None) for c in components)
    if stored <= budget:
        raise FitsUnquantized(
            f"it already fits as it is: {human_size(stored)} ({measure}) unquantized, within the budget of "
            f"{human_size(budget)}; nothing needs quantizing",
            hint="drop the budget to quantize anyway, or give a smaller one",
            nbytes=stored,
            budget=budget,
        )
    smallest = other_bytes + sum(min(c.size(b) for b in c.bits) for c in components)
    if smallest > budget:
        raise QtoolError(
            f"the budget of {human_size(budget)} ({measure}) is out of reach: the smallest size is "
            f"{human_size(smallest)}, with every quantizable layer at its smallest width",
            hint="raise the budget, or quantize more components (4-bit with double quant is the smallest method)",
        )
    best: tuple[float, int, tuple[int, ...], list[set[str]]] | None = None
    for widths in itertools.product(*(c.bits for c in components)):
        base = other_bytes + sum(c.size(b) for c, b in zip(components, widths, strict=True))
        if base > budget:
            continue
        knapsack = _Knapsack(components, widths)
        chosen = knapsack.solve(budget - base)
        kept: list[set[str]] = [set() for _ in components]
        for i in chosen:
            ci, name = knapsack.items[i]
            kept[ci] |= components[ci].groups[name]
        error = math.fsum(c.error(b, k) for c, b, k in zip(components, widths, kept, strict=True))
        size = other_bytes + sum(c.size(b, k) for c, b, k in zip(components, widths, kept, strict=True))
        if best is None or (error, size) < best[:2]:
            best = (error, size, widths, kept)
    assert best is not None  # the smallest widths fit
    error, _, widths, kept = best
    if math.isinf(error):
        raise QtoolError(
            f"no choice within {human_size(budget)} keeps every layer that 8-bit cannot hold (values beyond float16) "
            "out of 8-bit",
            hint="raise the budget, or allow only 4-bit",
        )
    return Choice(
        measure=measure,
        budget=budget,
        components=[_component_choice(c, b, k) for c, b, k in zip(components, widths, kept, strict=True)],
        other_bytes=other_bytes,
    )


def choose_within(components: list[ComponentCosts], budget: Budget, *, other_bytes: int = 0, margin: int = 0) -> Choice:
    """``choose`` for a Budget, with ``margin`` bytes kept back (``OFFSET_MARGIN`` per double-quant layer: their
    blobs' lengths are predicted, not known). Nothing needs quantizing (FitsUnquantized) when everything fits the
    whole budget as stored; a choice fits ``budget.bytes - margin``. The Choice records the whole budget."""
    stored = other_bytes + sum(c.size(None) for c in components)
    if stored <= budget.bytes:
        return choose(components, budget.bytes, other_bytes=other_bytes)  # raises FitsUnquantized
    try:
        choice = choose(components, budget.bytes - max(margin, 0), other_bytes=other_bytes)
    except FitsUnquantized:
        raise
    except QtoolError as e:
        message, hint = e.message, e.hint
        if margin > 0:
            message += (
                f" ({human_size(margin)} of the budget of {human_size(budget.bytes)} kept back for the double-quant "
                "offsets' text, whose length is known only once written)"
            )
        if 4 not in budget.bits:
            hint = "allow 4-bit too (drop --bits 8), or raise the budget"
        raise QtoolError(message, hint=hint) from None
    return replace(choice, budget=budget.bytes)


def choose_for_plans(
    plans: list[ComponentPlan],
    spec: QuantSpec,
    budget: Budget,
    errors: list[dict[str, dict[int, float]]],
    *,
    other_bytes: int = 0,
) -> Choice:
    """The choice for planned components (``qtool quantize`` and ``qtool footprint`` both come here): their costs
    in the budget's measure and widths (``component_costs``, with ``errors`` per plan as ``measure_errors`` or
    ``nominal_errors`` give them), and with double quant ``OFFSET_MARGIN`` bytes per layer kept back
    (``choose_within``)."""
    costs = [component_costs(plan, spec, e, budget.measure, budget.bits) for plan, e in zip(plans, errors, strict=True)]
    layers = sum(len(plan.layers) for plan in plans)
    margin = OFFSET_MARGIN * layers if spec.double_quant and 4 in budget.bits else 0
    return choose_within(costs, budget, other_bytes=other_bytes, margin=margin)


def _component_choice(costs: ComponentCosts, bits: int, kept: set[str]) -> ComponentChoice:
    order = list(costs.layers)
    params = sum(layer.params for layer in costs.layers.values())
    if kept and kept == set(costs.layers):
        return ComponentChoice(costs.name, None, tuple(order), (), costs.size(None), 0.0, params)
    skip = tuple(costs.skip)
    if kept:
        skip = tuple(dict.fromkeys([*costs.base_skip, *_cover(costs.groups, frozenset(kept), order)]))
    return ComponentChoice(
        name=costs.name,
        bits=bits,
        kept=tuple(f for f in order if f in kept),
        skip=skip,
        bytes=costs.size(bits, kept),
        error=costs.error(bits, kept),
        params=params,
    )


# --- the measurement ------------------------------------------------------------------------------------------------


def relative_error(stats) -> float:
    """noise / signal from ``verify.layer_stats``' vector (host): 0 for an all-zero weight, or where the weight
    holds NaN or Inf (allowed by the caller): keeping it 16-bit would keep those too."""
    from qtool.verify import STATS

    values = stats.tolist()
    signal, noise = values[STATS.index("signal")], values[STATS.index("noise")]
    if signal == 0 or not (math.isfinite(signal) and math.isfinite(noise)):
        return 0.0
    return noise / signal


def measure_errors(
    plan: ComponentPlan,
    reader: TensorReader,
    device: str = "cpu",
    options: dict | None = None,
    *,
    allow_nonfinite: bool = False,
    advance: Callable[[int], None] | None = None,
) -> dict[str, dict[int, float]]:
    """Each quantized layer's relative error (noise / signal) at 4-bit and at 8-bit, from one read of its weight.

    Streams the component's quantized weights through ``qtool.pipeline`` as a quantize run does (reads ahead on a
    thread, device work here), quantizes each twice (``quantize.quantize_pending``) and measures both against it
    (``verify.layer_stats``), and judges them as the run would (``verify.judge_layer``).

    Args:
        plan: the component (its ``layers`` are measured).
        reader: an open TensorReader over the component's weights.
        device: "cuda" or "cpu", as for quantizing.
        options: ``quantize_pending``'s keywords for 4-bit (``quantize_options(spec)``: quant_type, double_quant,
            blocksize, scale_search); the 8-bit pass takes those that are not 4-bit-only (scale_search, backend).
        allow_nonfinite: as the run's; otherwise NaN or Inf in a weight raises the run's QtoolError.
        advance: called with each weight's stored bytes as it is measured (progress).

    Returns:
        {fqn: {4: relative error, 8: relative error}}; 8-bit is ``math.inf`` for a weight holding values beyond
        float16's range, which 8-bit cannot hold (bnb casts to float16; the run would refuse it).
    """
    from qtool import quantize, verify
    from qtool.api import stream_component

    opts4 = dict(options or {})
    opts4.pop("bits", None)
    opts8 = {k: v for k, v in opts4.items() if k not in ("quant_type", "double_quant", "blocksize")} | {"bits": 8}
    # In the order the tensors lie in the files (save_file's layout is by name within a dtype), as a run reads them.
    groups = [[key] for key in sorted(plan.layers)]
    errors: dict[str, dict[int, float]] = {}
    bad_at = verify.STATS.index("bad_over")

    def compute(tensors: dict, slot):
        key, weight = next(iter(tensors.items()))
        if advance is not None:
            advance(plan.weights.tensors[key].nbytes)
        weight = weight.to(device, non_blocking=True)
        stats = {}
        for bits, opts in ((4, opts4), (8, opts8)):
            stats[str(bits)] = verify.layer_stats(weight, quantize.quantize_pending(weight, **opts))
        return key, slot.to_host(stats)

    def write(result) -> None:
        key, stats = result
        layer = plan.layers[key]
        name = verify.tensor_name(plan.name, key)
        verify.judge_layer(stats["4"], name, bits=4, shape=layer.shape, check_finite=not allow_nonfinite)
        e8 = math.inf
        if allow_nonfinite or stats["8"][bad_at].item() == 0:
            verify.judge_layer(stats["8"], name, bits=8, shape=layer.shape, check_finite=False)
            e8 = relative_error(stats["8"])
        errors[layer.fqn] = {4: relative_error(stats["4"]), 8: e8}

    stream_component(reader, groups, compute, write, device, groups)
    return errors

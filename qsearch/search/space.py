"""Search-space files: a base recipe plus the dimensions a study may change, validated before it runs.

A space is YAML, like a recipe, and is checked the same way (pydantic, unknown fields rejected, errors
with the file and the field path). It names

* ``base``: a complete recipe (``qsearch quantize`` accepts it as it is);
* ``layers``: glob patterns over layer names -> the choices of ``w_bits``, ``a_bits`` and
  ``group_size`` (``channel``, ``tensor`` or an integer) of those layers. A layer takes the choices of
  the first pattern that matches it. ``granularity`` says how many decisions that makes: one per
  ``layer``, one per ``block`` (``down_blocks.1``, ``mid_block``, ``transformer_blocks.3``, ...: the
  unit that mixed-precision papers such as ViDiT-Q and BitsFusion assign bits to), or one per
  ``pattern``;
* ``knobs``: dotted recipe paths -> choices (``stages.0.method: [uniform, ptq4dm]``,
  ``stages.1.alpha: [0.3, 0.5]``), i.e. the choice of a stage or of a stage's parameter;
* ``constraints`` (``max_avg_weight_bits``, ``max_model_mb``), the two minimized ``objectives``
  (quality: FID or the MSE to the FP samples; size: average weight bits or model MB), the Optuna
  ``sampler`` (with ``sampler_options``, its own keyword arguments) and ``seed``, the multi-fidelity
  settings and the trials enqueued first.

Why decisions are built from the model at study time and not listed in the file: the file stays
short and model-independent in its patterns, and the same decision names come out in every process
(they depend only on the model's layer names, in module order).
"""

from __future__ import annotations

import copy
import fnmatch
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from qsearch.quant.spec import FULL_PRECISION, QuantSpec
from qsearch.recipe import RecipeBase, RecipeError, format_errors, parse_recipe, read_yaml, recipe_schema

GroupSize = Union[Literal["tensor", "channel"], int]


class LayerChoices(BaseModel):
    """Choices for the layers of one pattern; a field left out keeps the base recipe's value."""

    model_config = ConfigDict(extra="forbid")

    w_bits: list[int | None] | None = Field(
        None, min_length=1, description="weight bits to choose from (null: FP weights)"
    )
    a_bits: list[int | None] | None = Field(
        None, min_length=1, description="activation bits to choose from (null: FP inputs)"
    )
    group_size: list[GroupSize] | None = Field(
        None, min_length=1, description="weight scale granularity: tensor, channel or a group size"
    )

    def dimensions(self) -> dict[str, list[Any]]:
        """The searched fields and their choices, in a fixed order."""
        return {k: v for k, v in (("w_bits", self.w_bits), ("a_bits", self.a_bits),
                                  ("group_size", self.group_size)) if v is not None}


class Constraints(BaseModel):
    """Budgets a configuration must meet to enter the Pareto front."""

    model_config = ConfigDict(extra="forbid")

    max_avg_weight_bits: float | None = Field(None, gt=0, description="parameter-weighted mean weight bits")
    max_model_mb: float | None = Field(None, gt=0, description="stored model size in MiB")

    def violations(self, size: dict[str, float]) -> dict[str, float]:
        """Optuna constraint values (feasible when <= 0) for a size report."""
        out = {}
        if self.max_avg_weight_bits is not None:
            out["avg_weight_bits"] = size["avg_weight_bits"] - self.max_avg_weight_bits
        if self.max_model_mb is not None:
            out["model_mb"] = size["model_mb"] - self.max_model_mb
        return out


class Objectives(BaseModel):
    """The two minimized objectives."""

    model_config = ConfigDict(extra="forbid")

    quality: Literal["fid", "mse"] = Field(
        "fid", description="fid (base.eval's extractor and samples) or mse to the FP samples"
    )
    size: Literal["avg_weight_bits", "model_mb"] = "avg_weight_bits"


class MultiFidelity(BaseModel):
    """Cheap proxy first; the full (FID) evaluation only for trials that can still enter the front."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    proxy: Literal["mse", "fid"] = Field(
        "mse", description="mse: fidelity to the FP samples; fid: FID on the proxy samples"
    )
    proxy_samples: int = Field(256, ge=2, description="samples (seeds eval.seed...) of the proxy")
    margin: float = Field(
        0.2, ge=0, description="prune only when a measured trial has <= size and a proxy better "
        "by this relative margin"
    )


class HypervolumeReference(BaseModel):
    """Reference point of the hypervolume (worst values); unset: from the trials, see pareto.py."""

    model_config = ConfigDict(extra="forbid")

    quality: float | None = None
    size: float | None = None


class SeedTrials(BaseModel):
    """Configurations enqueued before the sampler proposes any."""

    model_config = ConfigDict(extra="forbid")

    uniform: bool = Field(True, description="every layer at each weight-bit choice (the baselines)")
    sensitivity_targets: list[float] = Field(
        default_factory=list, description="average weight bits of BitsFusion-style assignments"
    )
    sensitivity_low_bits: int = Field(2, ge=1, le=8)
    sensitivity_samples: int = Field(16, ge=1, description="inputs of the sensitivity probe")
    sensitivity_neighbours: int = Field(
        0, ge=0, description="per sensitivity assignment, variants with 1-2 groups one bit choice off"
    )
    descent_rounds: int = Field(
        0, ge=0, description="per sensitivity target, rounds of one-step-down moves from the front point "
        "nearest above it (a greedy local search under the budget; 0: off)",
    )


class SearchSpace(BaseModel):
    """A study: base recipe, searched dimensions, constraints, objectives and sampler."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="study name (a study of this name is resumed)")
    base: dict[str, Any] = Field(description="the base recipe (as for qsearch quantize)")
    granularity: Literal["layer", "block", "pattern"] = Field(
        "block", description="one decision per layer, per block or per pattern of `layers`"
    )
    layers: dict[str, LayerChoices] = Field(
        default_factory=dict, description="glob over layer names -> choices (first match wins)"
    )
    knobs: dict[str, list[Any]] = Field(
        default_factory=dict, description="dotted recipe path -> choices, e.g. stages.0.method"
    )
    constraints: Constraints = Field(default_factory=Constraints)
    objectives: Objectives = Field(default_factory=Objectives)
    sampler: Literal["nsga2", "nsga3", "tpe", "random", "gp"] = "nsga2"
    population_size: int = Field(20, ge=2, description="NSGA-II/III generation size")
    sampler_options: dict[str, float | int | bool | str] = Field(
        default_factory=dict,
        description="further keyword arguments of the Optuna sampler, e.g. {crossover_prob: 0.2} for nsga2",
    )
    seed: int = Field(0, description="sampler seed; trial k is quantized with seed + k")
    trials: int = Field(100, ge=1, description="finished trials the study runs to")
    fidelity: MultiFidelity = Field(default_factory=MultiFidelity)
    seed_trials: SeedTrials = Field(default_factory=SeedTrials)
    hypervolume_reference: HypervolumeReference = Field(default_factory=HypervolumeReference)
    _source_text: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> "SearchSpace":
        if not self.layers and not self.knobs:
            raise ValueError("nothing to search: give `layers` and/or `knobs`")
        from qsearch.search.samplers import check_sampler_options

        check_sampler_options(self.sampler, self.sampler_options)
        for path, choices in self.knobs.items():
            if not choices:
                raise ValueError(f"knobs.{path}: give at least one choice")
            for value in choices:
                if not isinstance(value, (str, int, float, bool, type(None))):
                    raise ValueError(f"knobs.{path}: choices must be scalars (got {value!r})")
        return self

    @property
    def multi_fidelity(self) -> bool:
        """Whether a proxy evaluation comes first: pointless when the full evaluation is the proxy's
        metric on no more samples."""
        f = self.fidelity
        n_full = self.recipe().eval.n_samples
        return f.enabled and not (self.objectives.quality == f.proxy and f.proxy_samples >= n_full)

    def recipe(self) -> RecipeBase:
        """The validated base recipe."""
        return parse_recipe(self.base)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change when a study is resumed (the trial count and devices may)."""
        data = self.model_dump(mode="json", exclude={"trials"})
        ev = data["base"].get("eval", {})
        for key in ("device", "batch_size", "autocast"):
            ev.pop(key, None)
        return data


def _validate(data: Any, source: str) -> SearchSpace:
    if not isinstance(data, dict):
        raise RecipeError(source, [f"expected a mapping of search-space fields, got {type(data).__name__}"])
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, format_errors(exc)) from None
    problems: list[str] = []
    try:
        base = parse_recipe(space.base)
    except RecipeError as exc:
        raise RecipeError(source, [f"base.{p}" for p in exc.problems]) from None
    for path, choices in space.knobs.items():
        for i, value in enumerate(choices):
            try:
                parse_recipe(set_path(copy.deepcopy(space.base), path, value))
            except (RecipeError, KeyError, IndexError, TypeError) as exc:
                detail = "; ".join(exc.problems) if isinstance(exc, RecipeError) else str(exc)
                problems.append(f"knobs.{path}.{i}: {value!r}: {detail}")
    for pattern, choices in space.layers.items():
        for field, values in choices.dimensions().items():
            for i, value in enumerate(values):
                try:
                    QuantSpec(**{**base.quant.model_dump(), **spec_fields(field, value)})
                except ValidationError as exc:
                    problems.append(f"layers.{pattern}.{field}.{i}: {exc.errors()[0]['msg']}")
    if problems:
        raise RecipeError(source, problems)
    return space


def parse_space(data: Any, source: str = "<space>", text: str | None = None) -> SearchSpace:
    """Validate search-space data; ``text`` (the file as written) is kept for the study record."""
    space = _validate(data, source)
    space._source_text = text if text is not None else yaml.safe_dump(data, sort_keys=False)
    return space


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file."""
    data = read_yaml(path)
    return parse_space(data, str(path), Path(path).read_text())


def source_text(space: SearchSpace) -> str:
    """The space as submitted (the file's text, or YAML of the data it was built from)."""
    return space._source_text or yaml.safe_dump(space.model_dump(mode="json"), sort_keys=False)


def space_schema() -> dict[str, Any]:
    """JSON Schema of search-space files, with ``base`` checked as a recipe (registered stages included)."""
    schema = SearchSpace.model_json_schema()
    recipe = recipe_schema()
    defs = schema.setdefault("$defs", {})
    clash = set(defs) & set(recipe.get("$defs", {}))
    if clash:
        raise RuntimeError(f"schema definitions defined twice: {', '.join(sorted(clash))}")
    defs.update(recipe.pop("$defs", {}))
    schema["properties"]["base"] = {**recipe, "description": schema["properties"]["base"].get("description", "")}
    return schema


# --- recipe paths -----------------------------------------------------------------------------


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set ``a.0.b`` in nested dicts/lists (list items by index); returns ``data``."""
    parts = path.split(".")
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise TypeError(f"{path}: {type(node).__name__} has no field {last!r}")
    return data


def get_path(data: dict[str, Any], path: str, default: Any = None) -> Any:
    """The value at a dotted path, or ``default`` when a part is missing."""
    node: Any = data
    for part in path.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return default
    return node


def spec_fields(field: str, value: Any) -> dict[str, Any]:
    """QuantSpec fields for one searched value (``group_size: channel`` sets the granularity)."""
    if field != "group_size":
        return {field: value}
    if value in ("tensor", "channel"):
        return {"w_granularity": value, "group_size": None}
    return {"w_granularity": "group", "group_size": int(value)}


# --- decisions ----------------------------------------------------------------------------------


def block_of(layer: str) -> str:
    """The block a layer belongs to: ``down_blocks.1`` for ``down_blocks.1.resnets.0.conv1``,
    ``mid_block`` for ``mid_block.attentions.0.to_q``, ``conv_in`` for ``conv_in``."""
    parts = layer.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


@dataclass(frozen=True)
class Group:
    """Layers that share one decision per searched field."""

    key: str
    pattern: str
    layers: tuple[str, ...]
    choices: dict[str, tuple[Any, ...]]

    def param(self, field: str) -> str:
        """Optuna parameter name of this group's ``field``."""
        return f"{field}:{self.key}"

    def searches(self, field: str) -> bool:
        """Whether ``field`` is a decision here: a single choice pins it (first/last layers at 8 bits)."""
        return len(self.choices.get(field, ())) > 1


def layer_groups(space: SearchSpace, layer_names: list[str]) -> list[Group]:
    """The searched groups of a model's layers (full-precision ``keep_fp`` layers excluded).

    Raises ``ValueError`` for a pattern that matches no searchable layer (a typo, as in recipes).
    """
    plan = space.recipe().layer_plan()
    names = [n for n in layer_names if plan.spec_for(n) != FULL_PRECISION]
    members: dict[tuple[str, str], list[str]] = {}
    used: set[str] = set()
    for name in names:
        pattern = next((p for p in space.layers if fnmatch.fnmatchcase(name, p)), None)
        if pattern is None:
            continue
        used.add(pattern)
        unit = {"layer": name, "block": block_of(name), "pattern": pattern}[space.granularity]
        members.setdefault((unit, pattern), []).append(name)
    unused = [p for p in space.layers if p not in used]
    if unused:
        raise ValueError(f"layers patterns match no quantized layer of the model: {', '.join(unused)}")
    units_seen: set[str] = set()
    groups = []
    for (unit, pattern), layers in members.items():
        key = unit if unit not in units_seen else f"{unit}[{pattern}]"
        units_seen.add(unit)
        dims = {k: tuple(v) for k, v in space.layers[pattern].dimensions().items()}
        groups.append(Group(key, pattern, tuple(layers), dims))
    return groups


def distributions(space: SearchSpace, groups: list[Group]) -> dict[str, list[Any]]:
    """Every Optuna parameter of the study and its choices, in a fixed order."""
    params: dict[str, list[Any]] = {}
    for group in groups:
        for field, choices in group.choices.items():
            params[group.param(field)] = list(choices)
    for path, choices in space.knobs.items():
        params[f"knob:{path}"] = list(choices)
    return params


def build_recipe(space: SearchSpace, groups: list[Group], params: dict[str, Any]) -> dict[str, Any]:
    """The complete recipe dict of one configuration (``parse_recipe`` accepts it).

    Searched layers get exact-name overrides placed before the base recipe's own, carrying the
    fields of the base override that matched them (an override replaces, it does not stack). With
    the layer library, the layers of groups that search nothing are ``library_pinned``.
    """
    data = copy.deepcopy(space.base)
    for path, choices in space.knobs.items():
        set_path(data, path, params.get(f"knob:{path}", choices[0]))
    base_overrides: dict[str, dict[str, Any]] = dict(data.get("overrides") or {})
    overrides: dict[str, dict[str, Any]] = {}
    pinned: list[str] = []
    for group in groups:
        fields: dict[str, Any] = {}
        for field in group.choices:
            fields.update(spec_fields(field, params[group.param(field)]))
        for layer in group.layers:
            inherited = next((dict(v) for p, v in base_overrides.items() if fnmatch.fnmatchcase(layer, p)), {})
            overrides[glob.escape(layer)] = {**inherited, **fields}
        if not any(group.searches(field) for field in group.choices):
            pinned += [glob.escape(layer) for layer in group.layers]
    for pattern, fields in base_overrides.items():
        overrides.setdefault(pattern, fields)
    if overrides:
        data["overrides"] = overrides
    if pinned and data.get("layer_library"):
        data["library_pinned"] = [*data.get("library_pinned", []), *pinned]
    data["name"] = data.get("name") or space.name
    return data


def default_params(space: SearchSpace, groups: list[Group], **fixed: Any) -> dict[str, Any]:
    """A configuration at the base recipe's values where they are choices, else the first choice.

    ``fixed`` sets a field in every group that offers the value (``w_bits=4``: the uniform 4-bit
    configuration; a group pinned at 8 bits stays at 8, as the papers' uniform baselines keep their
    first and last layers).
    """
    quant = space.recipe().quant
    params: dict[str, Any] = {}
    for group in groups:
        for field, choices in group.choices.items():
            if field in fixed and fixed[field] in choices:
                params[group.param(field)] = fixed[field]
                continue
            base_value = {"w_bits": quant.w_bits, "a_bits": quant.a_bits,
                          "group_size": quant.group_size if quant.w_granularity == "group" else quant.w_granularity}[field]
            params[group.param(field)] = base_value if base_value in choices else choices[0]
    for path, choices in space.knobs.items():
        value = get_path(space.base, path)
        params[f"knob:{path}"] = value if value in choices else choices[0]
    return params


def canonical_json(data: Any) -> str:
    """Stable JSON (sorted keys) for comparisons and fingerprints."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))

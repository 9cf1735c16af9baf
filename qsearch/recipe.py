"""Recipe files: a quantization declared as data (YAML), validated before anything runs.

A recipe names the model, the sampler, the default ``QuantSpec`` of every layer, per-layer
overrides by glob pattern, the stages in order (each ``{method: NAME, ...params}``) and the
evaluation. The stage list is a pydantic discriminated union over every registered stage's config,
built when a recipe is validated, so third-party methods validate exactly like built-in ones and a
wrong field is reported with its full path (``stages.2.adaround.iters``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from qsearch.quant.apply import LayerPlan
from qsearch.quant.spec import QuantSpec
from qsearch.registry import REGISTRY, unknown_name_message
from qsearch.sampling import SamplerConfig
from qsearch.stages import KIND_ORDER, StageConfig


class EvalConfig(BaseModel):
    """How a quantized model is measured."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(1000, ge=2, description="samples generated for FID (fixed seeds)")
    batch_size: int = Field(250, ge=1)
    seed: int = Field(0, description="sample i starts from noise seeded seed + i")
    fid: bool = Field(True, description="compute FID against the reference statistics")
    feature_extractor: str = Field(
        "res9-cifar10", description="torch-fidelity extractor: res9-cifar10 or inception-v3-compat"
    )
    reference: str | None = Field(
        None, description="reference: stats .npz, image folder or torch-fidelity input name"
    )
    fidelity_samples: int = Field(
        64, ge=0, description="samples also drawn from the FP model for PSNR/MSE (0: none)"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    autocast: Literal["none", "bf16", "fp16"] = Field(
        "none", description="mixed precision of the sampling loop on GPU"
    )


class CalibrationPool(BaseModel):
    """The FP trajectories that calibration samplers choose from."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(64, ge=1, description="FP sampling runs recorded at every step")
    seed: int = Field(10_000, description="seeds of the pool (apart from evaluation seeds)")


class RecipeBase(BaseModel):
    """Fields of a recipe apart from the stage list."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    model: str = Field(description="diffusers pipeline/model folder, hub id, or zoo:NAME")
    variant: str | None = Field(None, description="weights variant, e.g. fp16")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    quant: QuantSpec = Field(default_factory=QuantSpec, description="default spec of every layer")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="glob pattern over layer names -> QuantSpec fields"
    )
    keep_fp: list[str] = Field(default_factory=list, description="layers kept in full precision")
    layer_library: bool = Field(
        False,
        description="build the model from layers calibrated once per distinct layer spec, each on a "
        "uniform model (qsearch.library): calibrated mixed precision at the cost of a model copy per "
        "configuration of a session; no error correctors",
    )
    library_pinned: list[str] = Field(
        default_factory=list,
        description="overrides keys whose spec every configuration shares (a search space's pinned first "
        "and last layers): each layer-library entry keeps them, so that the uniform entry is calibrated "
        "exactly as the recipe with those overrides would be; the search fills this",
    )
    calibration_pool: CalibrationPool = Field(default_factory=CalibrationPool)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def layer_plan(self) -> LayerPlan:
        """The per-layer quantization plan of this recipe."""
        overrides = {
            k: (v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else dict(v))
            for k, v in self.overrides.items()
        }
        return LayerPlan(default=self.quant, overrides=overrides, keep_fp=self.keep_fp)

    @model_validator(mode="after")
    def _stage_order(self) -> "RecipeBase":
        stages = getattr(self, "stages", [])
        kinds = [REGISTRY.get(s.method).kind for s in stages]
        ranks = [KIND_ORDER.index(k) for k in kinds]
        for i in range(1, len(ranks)):
            if ranks[i] < ranks[i - 1]:
                raise ValueError(
                    f"stages.{i} ({stages[i].method}, a {kinds[i]} stage) comes after a "
                    f"{kinds[i - 1]} stage; stages run in the order {' -> '.join(KIND_ORDER)}"
                )
        if kinds.count("calibration") > 1:
            raise ValueError("a recipe has at most one calibration stage")
        unknown = [p for p in self.library_pinned if p not in self.overrides]
        if unknown:
            raise ValueError(f"library_pinned: {', '.join(unknown)} are not keys of overrides")
        for pattern, override in self.layer_plan().overrides.items():
            try:
                QuantSpec(**{**self.quant.model_dump(), **override})
            except ValidationError as exc:
                raise ValueError(f"overrides.{pattern}: {exc.errors()[0]['msg']}") from None
        return self


# An override changes only the QuantSpec fields it names: all optional, unknown names rejected.
SpecOverride = create_model(
    "SpecOverride",
    __config__=ConfigDict(extra="forbid"),
    **{
        name: (Optional[f.annotation], FieldInfo.merge_field_infos(f, default=None))
        for name, f in QuantSpec.model_fields.items()
    },
)


@functools.cache
def _recipe_model(names: tuple[str, ...]) -> type[RecipeBase]:
    configs = tuple(REGISTRY.get(n).Config for n in names)
    if len(configs) > 1:
        stage_type: Any = Annotated[Union[configs], Field(discriminator="method")]
    else:  # pydantic needs two members for a discriminated union
        stage_type = configs[0] if configs else StageConfig
    return create_model(
        "Recipe",
        __base__=RecipeBase,
        stages=(list[stage_type], Field(default_factory=list, description="stages in order")),
        overrides=(dict[str, SpecOverride], Field(default_factory=dict)),
    )


def recipe_model() -> type[RecipeBase]:
    """The Recipe model for the stages registered now (third-party plugins included)."""
    return _recipe_model(tuple(REGISTRY.names()))


Recipe = RecipeBase  # the type stages and the engine annotate with; instances come from recipe_model()


class RecipeError(ValueError):
    """A recipe that failed validation: every problem with its file and field path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def format_errors(exc: ValidationError) -> list[str]:
    """``field.path: message`` lines, with close matches for unknown method names."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "union_tag_invalid":
            msg = unknown_name_message("method", str(err["ctx"]["tag"]), REGISTRY.names())
        elif err["type"] == "union_tag_not_found":
            msg = "each stage needs a 'method' field naming a registered stage"
        else:
            msg = err["msg"]
            if loc and "input" in err and err["type"] not in ("missing", "extra_forbidden"):
                shown = repr(err["input"])
                msg += f" (got {shown[:60]})"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def parse_recipe(data: Any, source: str = "<recipe>") -> RecipeBase:
    """Validate recipe data (a dict) against the registered stages."""
    if not isinstance(data, dict):
        raise RecipeError(source, [f"expected a mapping of recipe fields, got {type(data).__name__}"])
    try:
        return recipe_model().model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, format_errors(exc)) from None


def read_yaml(path: str | Path) -> Any:
    """YAML file contents; syntax errors become ``RecipeError`` with the line."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(str(path), ["file not found"])
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}invalid YAML ({getattr(exc, 'problem', exc)})"]) from None


def load_recipe(path: str | Path) -> RecipeBase:
    """Read and validate a recipe file."""
    return parse_recipe(read_yaml(path), str(path))


def recipe_schema() -> dict[str, Any]:
    """JSON Schema of recipe files (all registered stages included)."""
    return recipe_model().model_json_schema()


def stage_instances(recipe: RecipeBase) -> list:
    """The recipe's stages as configured stage objects, in order."""
    return [REGISTRY.get(cfg.method)(cfg) for cfg in getattr(recipe, "stages", [])]

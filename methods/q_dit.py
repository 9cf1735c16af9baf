"""Q-DiT: group quantization with evolutionary per-layer group sizes, and dynamic activations.

Chen, Meng, Tang, Ma, Jiang, Wang, Wang & Zhu, "Q-DiT: Accurate Post-Training Quantization for
Diffusion Transformers", CVPR 2025 (arXiv 2406.17343); authors' code: https://github.com/Juanerx/Q-DiT
(``qdit/quant.py``, ``scripts/evolution.py``, ``scripts/evolution.sh``).

DiT weights and activations vary strongly across *input channels*, so one scale per output channel
(weights) or per tensor (activations) wastes the grid. Q-DiT quantizes both in groups of input
channels, and activations dynamically, because their ranges also move with the timestep and the sample:

* **Fine-grained group quantization**: a linear layer's weight has one min-max scale per output row
  and group of ``g`` input channels; its input activation one scale per token and group of the same
  ``g`` channels (the authors' ``quantize_activation_wrapper``), computed at run time (dynamic).
* **Automatic granularity allocation**: the best ``g`` differs per layer, and the quality of the whole
  model is not the sum of per-layer errors, so ``g`` is searched jointly for all layers by an
  evolutionary search (the authors' ``EvolutionSearcher``, from Once-for-All): a candidate is one
  group size per layer (QKV share one, as the fused ``qkv`` linear of the original DiT), drawn from
  ``{32, 64, 128, 192, 288}``; it is legal if the mean group size is at least 128 (the cost of uniform
  groups of 128, which seeds the population); each epoch keeps the ``select`` best, then adds
  ``mutations`` (each gene resampled with probability 0.1) and ``crossovers`` (uniform) of them, and
  refills the population at random.

Layers outside the searched ones (embeddings, adaLN, patch embedding) get min-max grids from their
recipe spec (static activations calibrated on the calibration set), as ``rtn`` would set them.

What is partial: the authors' fitness is the FID of 800 generated samples per candidate and their
search runs 10 epochs of 50 candidates; both are far beyond the budget of a pipeline stage, so the
fitness here is the MSE of a few generated samples to the FP model's samples on the same seeds, and
the population, epochs and sample count are small by default (the paper's values are given in the
fields' descriptions). Weights are rounded to nearest (the authors' default
``quant_method max``; the GPTQ of their final ``quant_main.sh`` is not part of this stage). The
candidate sizes were chosen for DiT-XL's width 1152, which all of them divide; on narrower models a
size that does not divide a layer's width leaves a shorter last group (padded by repeating edge
values, see ``grid.group_view``), where the authors' code would refuse the size.
"""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Callable

import torch
from pydantic import Field, PositiveInt

from methods.ptq4dit import shared_inputs
from methods.rtn import calibrate_minmax, init_weights_minmax
from qsearch.quant.modules import QuantLinear
from qsearch.quant.quantizers import ActQuantizer, WeightQuantizer
from qsearch.quant.spec import QuantSpec
from qsearch.registry import register
from qsearch.stages import QuantContext, Quantizer, StageConfig

Candidate = tuple[int, ...]


def grouped_spec(spec: QuantSpec, group_size: int) -> QuantSpec:
    """The layer's spec with group-wise weights and dynamic per-token, per-group activations."""
    return QuantSpec(**{**spec.model_dump(), "w_granularity": "group", "group_size": group_size,
                        "a_dynamic": True, "a_granularity": "group", "a_group_size": group_size})


def search_genes(ctx: QuantContext, patterns: list[str], stage: str) -> list[list[str]]:
    """The searched units: quantized linears matching ``patterns`` that read one input in one module."""
    layers = ctx.layers()
    genes: list[list[str]] = []
    for members in shared_inputs(ctx, stage):
        by_parent: dict[str, list[str]] = {}
        for name in members:
            searched = any(fnmatch.fnmatchcase(name, p) for p in patterns)
            if searched and isinstance(layers.get(name), QuantLinear):
                by_parent.setdefault(name.rpartition(".")[0], []).append(name)
        genes += by_parent.values()
    return genes


class EvolutionSearch:
    """The authors' evolutionary search over one group size per gene, minimizing ``fitness``."""

    def __init__(
        self, n_genes: int, choices: list[int], min_mean: float, fitness: Callable[[Candidate], float],
        rng: random.Random,
    ) -> None:
        self.n_genes, self.choices, self.min_mean = n_genes, choices, min_mean
        self.fitness, self.rng = fitness, rng
        self.history: dict[Candidate, float] = {}

    def admit(self, cand: Candidate) -> bool:
        """Evaluate a new legal candidate (mean group size within budget); False for others."""
        if sum(cand) / len(cand) < self.min_mean or cand in self.history:
            return False
        self.history[cand] = self.fitness(cand)
        return True

    def _collect(self, make: Callable[[], Candidate], num: int) -> list[Candidate]:
        found: list[Candidate] = []
        for _ in range(num * 10):  # the authors' bound on tries
            if len(found) >= num:
                break
            cand = make()
            if self.admit(cand):
                found.append(cand)
        return found

    def random(self) -> Candidate:
        return tuple(self.rng.choice(self.choices) for _ in range(self.n_genes))

    def mutation(self, top: list[Candidate], prob: float) -> Callable[[], Candidate]:
        def make() -> Candidate:
            parent = self.rng.choice(top)
            return tuple(self.rng.choice(self.choices) if self.rng.random() < prob else g for g in parent)
        return make

    def crossover(self, top: list[Candidate]) -> Callable[[], Candidate]:
        def make() -> Candidate:
            a, b = self.rng.choice(top), self.rng.choice(top)
            return tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a, b))
        return make

    def run(self, preset: Candidate | None, *, population: int, select: int, mutations: int,
            crossovers: int, prob: float, epochs: int) -> Candidate:
        pool = [preset] if preset is not None and self.admit(preset) else []
        pool += self._collect(self.random, population - len(pool))
        top: list[Candidate] = []
        for _ in range(epochs):
            top = sorted(set(top) | set(pool), key=self.history.__getitem__)[:select]
            pool = self._collect(self.mutation(top, prob), mutations)
            pool += self._collect(self.crossover(top), crossovers)
            pool += self._collect(self.random, population - len(pool))
        if not self.history:
            raise RuntimeError("no candidate meets the group-size budget; lower min_mean_group_size")
        return min(self.history, key=self.history.__getitem__)


@register("q_dit")
class QDiT(Quantizer):
    """Group quantization with evolution-searched per-layer group sizes and dynamic activations."""

    paper = "Chen et al., Q-DiT: Accurate Post-Training Quantization for Diffusion Transformers, CVPR 2025"

    class Config(StageConfig):
        layers: list[str] = Field(
            default_factory=lambda: ["*attn*.to_*", "*ff.net.*"],
            description="glob patterns of the searched layers",
        )
        group_sizes: list[PositiveInt] = Field(
            default_factory=lambda: [32, 64, 128, 192, 288], min_length=1, description="allowed group sizes"
        )
        min_mean_group_size: float = Field(128, gt=0, description="budget: mean group size at least this")
        population: int = Field(8, ge=1, description="candidates per epoch (paper: 50)")
        select: int = Field(4, ge=1, description="top candidates kept as parents (paper: 10)")
        mutations: int = Field(4, ge=0, description="mutated children per epoch (paper: 25)")
        crossovers: int = Field(2, ge=0, description="crossover children per epoch (paper: 15)")
        mutation_prob: float = Field(0.1, ge=0.0, le=1.0, description="per-gene resampling probability")
        epochs: int = Field(3, ge=0, description="evolution epochs (paper: 10)")
        n_samples: int = Field(8, ge=1, description="samples generated per candidate for its fitness")
        seed: int = Field(1234, description="seeds of the fitness samples and of the search")

    def apply(self, ctx: QuantContext) -> None:
        cfg = self.config
        init_weights_minmax(ctx)
        layers = ctx.layers()
        genes = search_genes(ctx, cfg.layers, self.name)
        quantizers: dict[tuple[str, int], tuple[WeightQuantizer | None, ActQuantizer | None]] = {}

        def configure(cand: Candidate) -> None:
            for gene, size in zip(genes, cand):
                for name in gene:
                    if (name, size) not in quantizers:
                        quantizers[name, size] = self._grouped(layers[name], ctx.specs[name], size)
                    layers[name].weight_quantizer, layers[name].act_quantizer = quantizers[name, size]

        preset = tuple(128 if 128 in cfg.group_sizes else cfg.group_sizes[0] for _ in genes)
        configure(preset)
        calibrate_minmax(ctx, self.name)  # static inputs of the other layers

        def generate(denoiser) -> torch.Tensor:
            return ctx.sampler.sample(denoiser, cfg.n_samples, seed=cfg.seed, batch_size=ctx.batch_size)

        reference = generate(ctx.fp_denoiser)

        def fitness(cand: Candidate) -> float:
            configure(cand)
            return (generate(ctx.denoiser) - reference).pow(2).mean().item()

        search = EvolutionSearch(len(genes), list(cfg.group_sizes), cfg.min_mean_group_size, fitness,
                                 random.Random(cfg.seed))
        best = () if not genes else search.run(
            preset, population=cfg.population, select=cfg.select, mutations=cfg.mutations,
            crossovers=cfg.crossovers, prob=cfg.mutation_prob, epochs=cfg.epochs,
        )
        configure(best)
        calibrate_minmax(ctx, self.name)
        for gene, size in zip(genes, best):
            for name in gene:
                ctx.specs[name] = grouped_spec(ctx.specs[name], size)
        ctx.state["q_dit"] = {
            "group_sizes": {name: size for gene, size in zip(genes, best) for name in gene},
            "fitness": search.history.get(best),
            "history": search.history,
        }

    @staticmethod
    def _grouped(
        layer: QuantLinear, spec: QuantSpec, size: int
    ) -> tuple[WeightQuantizer | None, ActQuantizer | None]:
        """Min-max weight quantizer and dynamic activation quantizer, both with groups of ``size``."""
        spec = grouped_spec(spec, size)
        device = layer.weight.device
        wq = WeightQuantizer(spec, layer.weight.shape).to(device) if spec.w_bits is not None else None
        if wq is not None:
            wq.init_minmax(layer.weight.detach())
        aq = ActQuantizer(spec).to(device) if spec.a_bits is not None else None
        return wq, aq

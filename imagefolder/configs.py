"""Model configurations and presets.

One frozen dataclass per model (``TokenizerConfig``, ``GeneratorConfig``) and a pair
(``ModelConfig``) that ties a generator to the tokenizer whose tokens it predicts.
``PRESETS`` maps a name to a ``ModelConfig``; ``from_name`` raises with the known names.
The official numbers are those of the paper (arXiv 2410.01756) and its released configuration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from imagefolder.core.schedule import num_positions, scale_spans
from imagefolder.errors import InputError

OFFICIAL_SCALES: tuple[int, ...] = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)


def phi_indices(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """Which of the ``num_phi`` partially shared convs refines each scale.

    The official rule: conv k owns the tick ``linspace(1/(3K), 1-1/(3K), K)[k]`` and scale ``si``
    uses the conv whose tick is nearest to ``si/(SN-1)``.
    For SN=10, K=4 this gives [0,0,1,1,1,2,2,3,3,3].
    """
    if num_phi == 1:
        return (0,) * num_scales
    # Float64 arithmetic laid out like numpy.linspace: the two exact ties (si=2 and si=7 for SN=10)
    # are decided by rounding, and the official indices depend on that.
    start, stop = 1.0 / 3 / num_phi, 1.0 - 1.0 / 3 / num_phi
    step = (stop - start) / (num_phi - 1)
    ticks = [k * step + start for k in range(num_phi - 1)] + [stop]
    out = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        dists = [abs(t - at) for t in ticks]
        out.append(dists.index(min(dists)))
    return tuple(out)


@dataclass(frozen=True)
class TokenizerConfig:
    """The two-branch multi-scale residual tokenizer (official ``VQModel``, MSVR10P2)."""

    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    codebook_size: int = 4096
    code_dim: int = 32  # Z: channels of one branch's latent
    num_branches: int = 2  # product quantization; branch 0 = detail, branch 1 = semantic
    scales: tuple[int, ...] = OFFICIAL_SCALES
    num_phi: int = 4  # partially shared refinement convs per branch
    phi_ratio: float = 0.5  # phi(h) = (1-r) h + r conv(h)
    beta: float = 0.25  # commitment weight
    codebook_drop: float = 0.1  # fraction of a batch that gets quantizer dropout in training
    start_drop: int = 3  # dropout keeps at least this many scales
    with_teacher: bool = True  # official files carry the frozen DINOv2 teacher (semantic_model.*)

    @property
    def grid(self) -> int:
        """Patches per side of the image (16 for the official model)."""
        return self.image_size // self.patch_size

    @property
    def latent_size(self) -> int:
        """K: side of the finest latent grid (11 officially)."""
        return self.scales[-1]

    @property
    def num_latents(self) -> int:
        """Latent tokens per branch (121 officially)."""
        return self.latent_size**2

    @property
    def positions(self) -> int:
        """P: tokens per branch over all scales (286 officially)."""
        return num_positions(self.scales)

    @property
    def phi_index(self) -> tuple[int, ...]:
        return phi_indices(len(self.scales), self.num_phi)


@dataclass(frozen=True)
class GeneratorConfig:
    """The next-scale autoregressive transformer (official ``VAR``) with folded tokens."""

    depth: int = 17
    width: int = 1088
    heads: int = 17
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # row num_classes of class_emb is the null class
    codebook_size: int = 4096  # V per branch; the head has 2V outputs
    code_dim: int = 32  # Z per branch; the folded input has 2Z channels
    num_branches: int = 2
    scales: tuple[int, ...] = OFFICIAL_SCALES
    norm_eps: float = 1e-6
    drop_path: float = 0.1 * 17 / 24
    cond_drop: float = 0.1  # label replaced by the null class with this probability in training
    attn_scale_max: float = math.log(100.0)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def positions(self) -> int:
        return num_positions(self.scales)

    @property
    def folded_dim(self) -> int:
        return self.code_dim * self.num_branches

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def scale_offsets(self) -> tuple[int, ...]:
        """Index of the first position of each scale in the concatenated sequence."""
        return tuple(start for start, _ in scale_spans(self.scales))


@dataclass(frozen=True)
class ModelConfig:
    """A generator and the tokenizer it was trained on."""

    name: str
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)

    def __post_init__(self) -> None:
        tok, gen = self.tokenizer, self.generator
        if tok.scales != gen.scales:
            raise ValueError(f"{self.name}: tokenizer scales {tok.scales} != generator scales {gen.scales}")
        if (tok.codebook_size, tok.code_dim, tok.num_branches) != (gen.codebook_size, gen.code_dim, gen.num_branches):
            raise ValueError(f"{self.name}: generator vocabulary does not match the tokenizer")
        if gen.width % gen.heads:
            raise ValueError(f"{self.name}: width {gen.width} is not divisible by heads {gen.heads}")
        if tok.width % tok.heads:
            raise ValueError(f"{self.name}: tokenizer width {tok.width} is not divisible by heads {tok.heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        tok = dict(data["tokenizer"])
        gen = dict(data["generator"])
        tok["scales"] = tuple(tok["scales"])
        gen["scales"] = tuple(gen["scales"])
        return cls(name=data["name"], tokenizer=TokenizerConfig(**tok), generator=GeneratorConfig(**gen))


def official(codebook_size: int = 4096, depth: int = 17) -> ModelConfig:
    """The official layout: ViT-B tokenizer with a ``codebook_size`` codebook, VAR with heads=depth, width=64*depth."""
    tok = TokenizerConfig(codebook_size=codebook_size)
    gen = GeneratorConfig(
        depth=depth, width=64 * depth, heads=depth, codebook_size=codebook_size, drop_path=0.1 * depth / 24
    )
    suffix = "" if codebook_size == 4096 else f"-{codebook_size}"
    return ModelConfig(name=f"imagefolder-d{depth}{suffix}", tokenizer=tok, generator=gen)


TINY_SCALES: tuple[int, ...] = (1, 2, 3, 4, 6)


def tiny() -> ModelConfig:
    """Same architecture at a size that trains and runs on two CPU cores (64 px images, 5 scales)."""
    tok = TokenizerConfig(
        image_size=64,
        patch_size=8,
        width=128,
        depth=2,
        heads=4,
        codebook_size=256,
        code_dim=16,
        scales=TINY_SCALES,
        num_phi=4,
        with_teacher=False,
    )
    gen = GeneratorConfig(
        depth=4,
        width=128,
        heads=4,
        num_classes=10,
        codebook_size=256,
        code_dim=16,
        scales=TINY_SCALES,
        drop_path=0.0,
    )
    return ModelConfig(name="tiny", tokenizer=tok, generator=gen)


PRESETS: dict[str, ModelConfig] = {
    "imagefolder-d17": official(4096),
    "imagefolder-d17-8192": official(8192),
    "imagefolder-d17-16384": official(16384),
    "tiny": tiny(),
}


def from_name(name: str) -> ModelConfig:
    """Look up a preset by its exact name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None

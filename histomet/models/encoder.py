"""CONCH-shaped ViT-B/16 vision tower and the uint8-in patch encoder around it.

The tower mirrors the image side of CONCH (Lu et al., Nature Medicine 2024) as
its public code builds it (``mahmoodlab/CONCH``, ``conch/open_clip_custom``).
The trunk is a timm ``VisionTransformer`` at 448 px. Its ``forward_features``
tokens (CLS and patches, after the final norm) go through an attentional pooler
with one query, a LayerNorm, and a square projection. Parameter names follow
that code, so the ``visual.*`` entries of a CONCH checkpoint load by name once
the prefix is stripped (see :func:`select_vision_tower_state`).

With the same random weights, this tower's outputs match ``CoCa.encode_image``
of ``conch-fork`` 0.1.0 within 1e-5 (``tests/test_conch_parity.py``, which
needs the optional ``conch`` extra). That test builds CoCa from conch's own
config, so the names, norms and activation are the package's.

NOTE: not yet loaded from the gated released ``pytorch_model.bin``, so a key
that exists only in the release file would still be reported as unexpected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from histomet.errors import InputError
from histomet.models.resize import SeparableResize

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CheckpointMismatchError",
    "EncoderConfig",
    "PatchEncoder",
    "VisionTower",
    "build_demo_encoder",
    "load_encoder_checkpoint",
    "select_vision_tower_state",
]

_LOGGER = logging.getLogger(__name__)

# OpenAI CLIP normalisation, which CONCH's preprocessing uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LayerNorm eps: timm's ViT uses 1e-6, torch's default (CONCH pooler) is 1e-5.
_TRUNK_NORM_EPS = 1e-6
_POOLER_NORM_EPS = 1e-5

# Entries of a CONCH ``visual`` state dict that the contrastive path never uses.
_CAPTION_PREFIXES = ("attn_pool_caption.", "ln_caption.")

# How many offending keys a checkpoint error lists per kind.
_MAX_KEYS_LISTED = 8


class CheckpointMismatchError(InputError):
    """A checkpoint's keys or shapes do not match the encoder."""


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the vision tower and of the tiles the encoder accepts.

    ``input_tile_px`` is the side of the uint8 tiles the graph takes, and
    ``image_px`` the side of the ViT input after the in-graph resize.
    """

    image_px: int = 448
    patch_px: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    embed_dim: int = 512
    pooler_heads: int = 8
    input_tile_px: int = 512
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.image_px % self.patch_px != 0:
            raise ValueError(
                f"image_px {self.image_px} is not a multiple of patch_px "
                f"{self.patch_px}"
            )
        if self.width % self.heads != 0:
            raise ValueError(
                f"width {self.width} is not divisible by heads {self.heads}"
            )
        if self.embed_dim % self.pooler_heads != 0:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by pooler_heads "
                f"{self.pooler_heads}"
            )

    @classmethod
    def tiny(cls) -> EncoderConfig:
        """Return a small tower for tests: 64 px ViT (4x4 patches), 96 px tiles.

        The 96 -> 64 downscale keeps the antialiased resize in the graph, and
        the 32-d embeddings are smaller than the real 512-d ones on purpose.
        """
        return cls(
            image_px=64,
            patch_px=16,
            width=64,
            depth=2,
            heads=2,
            mlp_ratio=4,
            embed_dim=32,
            pooler_heads=4,
            input_tile_px=96,
        )

    @property
    def grid_px(self) -> int:
        """Patches per image side."""
        return self.image_px // self.patch_px

    @property
    def n_tokens(self) -> int:
        """Trunk tokens per image: the CLS token plus one per patch."""
        return self.grid_px * self.grid_px + 1


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, ``[B, 3, H, W] -> [B, H*W/p^2, width]``."""

    def __init__(self, patch_px: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_px, stride=patch_px)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        logits = torch.matmul(q * self.head_dim**-0.5, k.transpose(-2, -1))
        mixed = torch.matmul(logits.softmax(dim=-1), v)
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    """Two-layer feed-forward block with exact GELU."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=_TRUNK_NORM_EPS)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=_TRUNK_NORM_EPS)
        self.mlp = Mlp(width, width * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT trunk returning all normalised tokens ``[B, 1 + grid^2, width]``.

    The names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``blocks.<i>.*``, ``norm``) are timm's, which CONCH's trunk is.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(config.patch_px, config.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_tokens, config.width))
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width, eps=_TRUNK_NORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class CrossAttention(nn.Module):
    """Multi-head attention from queries to context tokens of another width.

    The parameters carry the names ``nn.MultiheadAttention`` gives them when
    ``kdim``/``vdim`` differ from the query width (separate ``q/k/v_proj_weight``,
    one packed ``in_proj_bias``), so its state dict entries load unchanged.
    """

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
        self.k_proj_weight = nn.Parameter(torch.empty(dim, context_dim))
        self.v_proj_weight = nn.Parameter(torch.empty(dim, context_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(weight)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attend ``queries [B, Q, dim]`` over ``context [B, T, context_dim]``."""
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        q = F.linear(queries, self.q_proj_weight, bias_q)
        k = F.linear(context, self.k_proj_weight, bias_k)
        v = F.linear(context, self.v_proj_weight, bias_v)

        batch, n_queries, dim = q.shape
        q = q.reshape(batch, n_queries, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, -1, self.heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, -1, self.heads, self.head_dim).transpose(1, 2)

        logits = torch.matmul(q * self.head_dim**-0.5, k.transpose(-2, -1))
        mixed = torch.matmul(logits.softmax(dim=-1), v)
        return self.out_proj(mixed.transpose(1, 2).reshape(batch, n_queries, dim))


class AttentionalPooler(nn.Module):
    """Learned queries attending over the trunk tokens (CoCa's pooler)."""

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.attn = CrossAttention(dim, context_dim, heads)
        self.ln_q = nn.LayerNorm(dim, eps=_POOLER_NORM_EPS)
        self.ln_k = nn.LayerNorm(context_dim, eps=_POOLER_NORM_EPS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pool ``tokens [B, T, context_dim]`` into ``[B, n_queries, dim]``."""
        context = self.ln_k(tokens)
        queries = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(queries, context)


class VisionTower(nn.Module):
    """CONCH's image side: trunk, contrastive attentional pooler, projection.

    ``forward`` takes normalised ``[B, 3, image_px, image_px]`` float images and
    returns ``(embedding, projected)``, both ``[B, embed_dim]``. ``embedding`` is
    what CONCH's ``encode_image(proj_contrast=False, normalize=False)`` returns,
    and ``projected`` is ``encode_image(proj_contrast=True, normalize=True)``.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = VisionTransformer(config)
        self.attn_pool_contrast = AttentionalPooler(
            config.embed_dim, config.width, config.pooler_heads, n_queries=1
        )
        self.ln_contrast = nn.LayerNorm(config.embed_dim, eps=_POOLER_NORM_EPS)
        self.proj_contrast = nn.Parameter(
            config.width**-0.5 * torch.randn(config.embed_dim, config.embed_dim)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.trunk(images)
        pooled = self.attn_pool_contrast(tokens)[:, 0]
        embedding = self.ln_contrast(pooled)
        projected = F.normalize(torch.matmul(embedding, self.proj_contrast), dim=-1)
        return embedding, projected


class PatchEncoder(nn.Module):
    """Encoder that takes raw tiles: uint8 ``[B, tile, tile, 3]`` RGB.

    Inside the module (and so inside the exported graph): cast to float, scale
    to 0..1, NHWC to NCHW, antialiased bicubic resize from ``input_tile_px`` to
    ``image_px``, CLIP mean/std normalisation, then the tower. Returns
    ``(embedding, projected)``, float32 ``[B, embed_dim]`` each, and
    ``projected`` has unit L2 norm.

    NOTE: CONCH's own preprocessing resizes with PIL on uint8, which rounds
    and clips after each of its two passes. This graph keeps full precision,
    so its resized pixels differ from PIL's by up to one grey level on tissue
    (more on full-range noise, where PIL clips its intermediate row pass).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.resize = SeparableResize(config.input_tile_px, config.image_px)
        mean = torch.tensor(config.mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.tower = VisionTower(config)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_tracing():
            self._check_tiles(tiles)
        images = tiles.to(self.mean.dtype).div(255.0).permute(0, 3, 1, 2)
        images = self.resize(images)
        images = (images - self.mean) / self.std
        return self.tower(images)

    def _check_tiles(self, tiles: torch.Tensor) -> None:
        side = self.config.input_tile_px
        expected = (side, side, 3)
        if tiles.dim() != 4 or tuple(tiles.shape[1:]) != expected:
            raise InputError(
                f"invalid tile batch shape: {tuple(tiles.shape)}",
                f"Pass uint8 [B, {side}, {side}, 3] RGB tiles",
            )
        if tiles.dtype != torch.uint8:
            raise InputError(f"invalid tile dtype: {tiles.dtype}", "Pass uint8 tiles")


def _init_demo_weights(tower: VisionTower) -> None:
    # ViT-style init: truncated normal 0.02 for linear layers and embeddings,
    # so activations keep a realistic scale through the 12 blocks.
    for module in tower.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    nn.init.trunc_normal_(tower.trunk.pos_embed, std=0.02)
    nn.init.normal_(tower.trunk.cls_token, std=1e-6)
    patch_proj = tower.trunk.patch_embed.proj
    kernel_h, kernel_w = patch_proj.kernel_size
    fan_in = patch_proj.in_channels * kernel_h * kernel_w
    nn.init.trunc_normal_(patch_proj.weight, std=math.sqrt(1.0 / fan_in))
    nn.init.zeros_(patch_proj.bias)


def build_demo_encoder(
    config: EncoderConfig | None = None, seed: int = 0
) -> PatchEncoder:
    """Build a ``PatchEncoder`` with seeded random weights, in eval mode.

    The same ``config`` and ``seed`` give bit-identical weights on one torch
    version. The outputs carry no pathology meaning.
    """
    config = config or EncoderConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = PatchEncoder(config)
        _init_demo_weights(encoder.tower)
    return encoder.eval()


def select_vision_tower_state(
    state: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Extract the vision tower's entries from a full CONCH state dict.

    Keeps the ``visual.`` entries with the prefix stripped and drops the
    captioning pooler (``attn_pool_caption``, ``ln_caption``), which the
    contrastive embedding never uses. A state dict without ``visual.`` keys is
    returned unchanged, since it is taken to be a tower state dict already.
    """
    prefix = "visual."
    if not any(key.startswith(prefix) for key in state):
        return dict(state)
    tower_state = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith(_CAPTION_PREFIXES):
            continue
        tower_state[name] = value
    return tower_state


def _describe_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> list[str]:
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong_shape = [
        f"{key} {tuple(found[key].shape)} != {tuple(expected[key].shape)}"
        for key in expected
        if key in found and tuple(found[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    for kind, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch (checkpoint != model)", wrong_shape),
    ):
        if keys:
            listed = ", ".join(keys[:_MAX_KEYS_LISTED])
            more = len(keys) - _MAX_KEYS_LISTED
            suffix = f" and {more} more" if more > 0 else ""
            problems.append(f"{len(keys)} {kind}: {listed}{suffix}")
    return problems


def load_encoder_checkpoint(
    path: str | Path, config: EncoderConfig | None = None
) -> PatchEncoder:
    """Load a ``PatchEncoder`` from a vision-tower state dict, strictly.

    The file is read with ``torch.load(weights_only=True)``. It may hold the
    tower's own state dict or a full CONCH state dict (see
    :func:`select_vision_tower_state`). Every tower parameter must be present
    with the right shape and nothing else may be left over, otherwise
    :class:`CheckpointMismatchError` lists the first offending keys.
    """
    path = Path(path)
    config = config or EncoderConfig()
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise CheckpointMismatchError(
            f"checkpoint is not a state dict: {path} contains {type(loaded).__name__}",
            "Save the tower with torch.save(encoder.tower.state_dict(), path)",
        )
    state = select_vision_tower_state(loaded)

    encoder = PatchEncoder(config)
    problems = _describe_mismatch(encoder.tower.state_dict(), state)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not match the vision tower: {path}: "
            + "; ".join(problems),
            f"Check that the file is a CONCH ViT-B/16 vision tower for {config}",
        )

    encoder.tower.load_state_dict(state, strict=True)
    _LOGGER.info("loaded encoder checkpoint with %d tensors", len(state))
    return encoder.eval()

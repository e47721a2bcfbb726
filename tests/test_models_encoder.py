"""CONCH-shaped encoder: names, shapes, preprocessing and checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histomet.errors import InputError
from histomet.models.encoder import CheckpointMismatchError
from histomet.models.encoder import EncoderConfig
from histomet.models.encoder import PatchEncoder
from histomet.models.encoder import build_demo_encoder
from histomet.models.encoder import load_encoder_checkpoint
from histomet.models.encoder import select_vision_tower_state

# Parameter shapes of CONCH's ViT-B/16 vision tower at 448 px, from its source
# (timm VisionTransformer trunk, AttentionalPooler with one query, 8 heads).
CONCH_SHAPES = {
    "trunk.cls_token": (1, 1, 768),
    "trunk.pos_embed": (1, 785, 768),
    "trunk.patch_embed.proj.weight": (768, 3, 16, 16),
    "trunk.patch_embed.proj.bias": (768,),
    "trunk.blocks.0.norm1.weight": (768,),
    "trunk.blocks.0.attn.qkv.weight": (2304, 768),
    "trunk.blocks.0.attn.qkv.bias": (2304,),
    "trunk.blocks.0.attn.proj.weight": (768, 768),
    "trunk.blocks.0.norm2.bias": (768,),
    "trunk.blocks.11.mlp.fc1.weight": (3072, 768),
    "trunk.blocks.11.mlp.fc2.weight": (768, 3072),
    "trunk.norm.weight": (768,),
    "attn_pool_contrast.query": (1, 512),
    "attn_pool_contrast.attn.q_proj_weight": (512, 512),
    "attn_pool_contrast.attn.k_proj_weight": (512, 768),
    "attn_pool_contrast.attn.v_proj_weight": (512, 768),
    "attn_pool_contrast.attn.in_proj_bias": (1536,),
    "attn_pool_contrast.attn.out_proj.weight": (512, 512),
    "attn_pool_contrast.ln_q.weight": (512,),
    "attn_pool_contrast.ln_k.weight": (768,),
    "ln_contrast.weight": (512,),
    "proj_contrast": (512, 512),
}


@pytest.fixture(scope="module")
def tiny_encoder() -> PatchEncoder:
    return build_demo_encoder(EncoderConfig.tiny(), seed=0)


def _random_tiles(batch: int, tile_px: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (batch, tile_px, tile_px, 3), generator=generator, dtype=torch.uint8
    )


def test_full_tower_has_conch_names_and_shapes() -> None:
    # Built on the meta device: only names and shapes, no 350 MB of weights.
    with torch.device("meta"):
        encoder = PatchEncoder(EncoderConfig())
    state = encoder.tower.state_dict()
    shapes = {name: tuple(value.shape) for name, value in state.items()}

    for name, shape in CONCH_SHAPES.items():
        assert shapes.get(name) == shape, name
    # Trunk embedding 4, 12 blocks of 12, trunk norm 2, pooler 11, ln_contrast 2,
    # proj_contrast 1.
    assert len(shapes) == 4 + 12 * 12 + 2 + 11 + 2 + 1
    assert sum(value.numel() for value in state.values()) == 87_829_248


def test_full_config_defaults_match_conch() -> None:
    config = EncoderConfig()

    assert config.image_px == 448
    assert config.input_tile_px == 512
    assert config.n_tokens == 785
    assert config.embed_dim == 512


def test_encoder_outputs_shapes_and_unit_norm(tiny_encoder: PatchEncoder) -> None:
    tiles = _random_tiles(3, 96, seed=1)

    with torch.no_grad():
        embedding, projected = tiny_encoder(tiles)

    assert embedding.shape == (3, 32)
    assert projected.shape == (3, 32)
    assert embedding.dtype == torch.float32
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)


def test_encoder_preprocessing_matches_manual_pipeline(
    tiny_encoder: PatchEncoder,
) -> None:
    tiles = _random_tiles(2, 96, seed=2)
    images = tiles.permute(0, 3, 1, 2).double() / 255.0
    images = torch.nn.functional.interpolate(
        images, size=(64, 64), mode="bicubic", antialias=True, align_corners=False
    )
    config = EncoderConfig.tiny()
    mean = torch.tensor(config.mean, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float64).reshape(1, 3, 1, 1)
    images = ((images - mean) / std).float()

    with torch.no_grad():
        expected = tiny_encoder.tower(images)
        actual = tiny_encoder(tiles)

    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=0)


def test_encoder_rejects_wrong_tile_size(tiny_encoder: PatchEncoder) -> None:
    with pytest.raises(InputError, match=r"\[B, 96, 96, 3\]"):
        tiny_encoder(_random_tiles(1, 64, seed=3))


def test_encoder_rejects_float_tiles(tiny_encoder: PatchEncoder) -> None:
    with pytest.raises(InputError, match="dtype"):
        tiny_encoder(torch.zeros(1, 96, 96, 3))


def test_demo_encoder_is_deterministic_per_seed() -> None:
    first = build_demo_encoder(EncoderConfig.tiny(), seed=5).tower.state_dict()
    second = build_demo_encoder(EncoderConfig.tiny(), seed=5).tower.state_dict()
    other = build_demo_encoder(EncoderConfig.tiny(), seed=6).tower.state_dict()

    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["trunk.pos_embed"], other["trunk.pos_embed"])


def test_checkpoint_round_trip(tiny_encoder: PatchEncoder, tmp_path: Path) -> None:
    path = tmp_path / "tower.pt"
    torch.save(tiny_encoder.tower.state_dict(), path)
    tiles = _random_tiles(2, 96, seed=4)

    loaded = load_encoder_checkpoint(path, EncoderConfig.tiny())
    with torch.no_grad():
        expected = tiny_encoder(tiles)
        actual = loaded(tiles)

    assert not loaded.training
    assert torch.equal(actual[0], expected[0])
    assert torch.equal(actual[1], expected[1])


def test_checkpoint_with_visual_prefix_loads(
    tiny_encoder: PatchEncoder, tmp_path: Path
) -> None:
    tower_state = tiny_encoder.tower.state_dict()
    state = {f"visual.{name}": value for name, value in tower_state.items()}
    state["visual.attn_pool_caption.query"] = torch.zeros(4, 64)
    state["visual.ln_caption.weight"] = torch.ones(64)
    state["text.positional_embedding"] = torch.zeros(8, 64)
    path = tmp_path / "conch_like.pt"
    torch.save(state, path)

    loaded = load_encoder_checkpoint(path, EncoderConfig.tiny())

    assert torch.equal(loaded.tower.proj_contrast, tiny_encoder.tower.proj_contrast)


def test_select_vision_tower_state_strips_prefix_and_caption() -> None:
    state = {
        "visual.trunk.norm.weight": torch.ones(2),
        "visual.attn_pool_caption.query": torch.ones(2),
        "visual.ln_caption.bias": torch.ones(2),
        "text.ln_final.weight": torch.ones(2),
    }

    assert list(select_vision_tower_state(state)) == ["trunk.norm.weight"]


def test_checkpoint_with_renamed_key_lists_both_names(
    tiny_encoder: PatchEncoder, tmp_path: Path
) -> None:
    state = dict(tiny_encoder.tower.state_dict())
    weight = state.pop("trunk.blocks.0.attn.qkv.weight")
    state["trunk.blocks.0.attn.qkv_renamed.weight"] = weight
    path = tmp_path / "renamed.pt"
    torch.save(state, path)

    with pytest.raises(CheckpointMismatchError) as caught:
        load_encoder_checkpoint(path, EncoderConfig.tiny())

    message = str(caught.value)
    assert "1 missing: trunk.blocks.0.attn.qkv.weight" in message
    assert "1 unexpected: trunk.blocks.0.attn.qkv_renamed.weight" in message


def test_checkpoint_with_missing_key_lists_it(
    tiny_encoder: PatchEncoder, tmp_path: Path
) -> None:
    state = dict(tiny_encoder.tower.state_dict())
    del state["ln_contrast.bias"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)

    with pytest.raises(CheckpointMismatchError, match="1 missing: ln_contrast.bias"):
        load_encoder_checkpoint(path, EncoderConfig.tiny())


def test_checkpoint_with_wrong_shape_lists_it(
    tiny_encoder: PatchEncoder, tmp_path: Path
) -> None:
    state = dict(tiny_encoder.tower.state_dict())
    state["trunk.pos_embed"] = torch.zeros(1, 10, 64)
    path = tmp_path / "wrong_shape.pt"
    torch.save(state, path)

    with pytest.raises(CheckpointMismatchError) as caught:
        load_encoder_checkpoint(path, EncoderConfig.tiny())

    assert "trunk.pos_embed (1, 10, 64) != (1, 17, 64)" in str(caught.value)


def test_checkpoint_of_wrong_type_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)

    with pytest.raises(CheckpointMismatchError, match="not a state dict"):
        load_encoder_checkpoint(path, EncoderConfig.tiny())

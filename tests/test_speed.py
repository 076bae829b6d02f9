"""The CPU speed levers: each gives the same numbers as the plain path (or says why not) and can be off."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest
import torch

from pfedsam.config import ConfigError, load_config
from pfedsam.data.synth import write_synthetic_sites
from pfedsam.model import ParamKind, build_pfedsam
from pfedsam.train import SiteTrainer
from pfedsam.train.cache import FeatureCache, default_cache_dir
from pfedsam.train.encoder_runtime import bf16_autocast, resolve_runtime

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speed")
    write_synthetic_sites(root / "set", sites=1, per_site=12, seed=0)
    return root / "set" / "site-1"


@pytest.mark.parametrize("backbone,prompt,experts", [
    ("tiny", "none", True), ("tiny", "box", False), ("litemedsam", "none", True), ("litemedsam", "none", False),
])
def test_fast_decoder_gives_the_same_logits_and_gradients(backbone, prompt, experts):
    cfg = load_config(overrides=[f"backbone={backbone}", f"prompt={prompt}"])
    model = build_pfedsam(cfg)
    model.registry.set_trainable(model, {ParamKind.GLOBAL, ParamKind.LOCAL})
    side = model.mask_decoder.transformer_dim
    emb = model.prompt_encoder.image_embedding_size
    torch.manual_seed(0)
    feats = torch.randn(2, side, *emb)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 2.0, 30.0, 60.0]])
    runs = []
    for fast in (False, True):
        model.fast_upscale = fast
        model.zero_grad()
        logits = model.forward_from_prefix(feats, boxes, use_experts=experts)
        (logits.sigmoid().mean() + logits.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((logits.detach(), grads))
    (plain, g_plain), (fast, g_fast) = runs
    assert fast.shape == plain.shape == (2, 1, model.image_size, model.image_size)
    torch.testing.assert_close(fast, plain, atol=2e-5 * plain.abs().max().item(), rtol=1e-4)
    assert g_plain.keys() == g_fast.keys()
    # k_proj biases have an exact-zero true gradient (softmax ignores a shift): compare to the total norm
    total = torch.sqrt(sum(g.square().sum() for g in g_plain.values()))
    worst = max(float((g_plain[n] - g_fast[n]).norm()) for n in g_plain)
    assert worst < 1e-4 * float(total)
    upscaling = {n for n in g_plain if "output_upscaling" in n}
    assert upscaling and all(g_fast[n].abs().sum() > 0 for n in upscaling)


def test_fast_decoder_activations_follow_bf16_autocast():
    """Under bf16 autocast the activation after the upscaling LayerNorm (float32 by autocast's rules)
    runs in bf16, as the rest of the upscaling does, and the transformer's image tokens are held in
    bf16 between its LayerNorms; the logits stay within bf16 rounding of the
    convolution path's."""
    model = build_pfedsam(load_config(overrides=["backbone=litemedsam", "prompt=none"]))
    seen: list[torch.dtype] = []
    model.mask_decoder.output_upscaling[2].register_forward_hook(lambda m, inp, out: seen.append(inp[0].dtype))
    keys: list[torch.dtype] = []  # the image tokens as the second block's key projection reads them
    model.mask_decoder.transformer.layers[1].cross_attn_token_to_image.k_proj.register_forward_hook(
        lambda m, inp, out: keys.append(inp[0].dtype))
    torch.manual_seed(0)
    feats = torch.randn(2, model.mask_decoder.transformer_dim, *model.prompt_encoder.image_embedding_size)
    logits = {}
    for fast in (False, True):
        model.fast_upscale = fast
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits[fast] = model.forward_from_prefix(feats, None, use_experts=False).float()
    assert seen == [torch.float32, torch.bfloat16]  # the convolution path keeps segment_anything's float32 GELU
    assert keys == [torch.float32, torch.bfloat16]  # held in bf16: no cast per projection
    scale = logits[False].abs().max().item()
    assert (logits[True] - logits[False]).abs().max().item() < 2e-2 * scale


@pytest.mark.parametrize("dtype,stored,tol", [("float32", torch.float32, 0.0), ("float16", torch.float16, 1e-3)])
def test_cache_dtype_is_stored_and_read_back(tmp_path, dtype, stored, tol):
    cache = FeatureCache("disk", "fp", tmp_path, dtype=dtype)
    images = torch.rand(3, 3, 8, 8)
    keys = [cache.key(i) for i in images]
    feats = cache.features(keys, lambda pos: images[pos], lambda x: x * 3.0)
    assert feats.dtype == torch.float32 and feats.is_contiguous()
    last = cache.features(keys, lambda pos: pytest.fail("cached"), None, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, feats)
    torch.testing.assert_close(feats, images * 3.0, atol=tol * 3, rtol=tol)
    files = sorted(tmp_path.glob("*/*.pt"))
    assert len(files) == 3 and torch.load(files[0], weights_only=True).dtype == stored
    again = FeatureCache("disk", "fp", tmp_path, dtype=dtype)
    torch.testing.assert_close(again.features(keys, lambda pos: pytest.fail("cached"), None), feats)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_features_encoded_in_bf16_never_share_entries_with_float32_ones(tmp_path, site, runtime):
    """The torch cache fill runs under train.amp's bf16 autocast; ONNX Runtime always in float32."""
    keys = {}
    for amp in (False, True):
        cfg = load_config(overrides=["backbone=litemedsam", "train.device=cpu", "train.cache=disk",
                                     f"train.cache_dir={tmp_path}", f"train.encoder_runtime={runtime}",
                                     f"train.amp={str(amp).lower()}"])
        trainer = SiteTrainer(cfg, "site-1", site_dir=site, workdir=tmp_path / f"w{amp}")
        keys[amp] = (trainer.amp, trainer._split("train").keys[0])
    bf16_fill = runtime == "torch" and keys[True][0]  # amp stays off on a CPU without bf16 instructions
    assert (keys[True][1] != keys[False][1]) == bf16_fill


def test_float16_and_float32_entries_never_mix(tmp_path):
    image = torch.rand(3, 8, 8)
    assert FeatureCache("disk", "fp", tmp_path).key(image) != FeatureCache("disk", "fp", tmp_path,
                                                                         dtype="float16").key(image)


def test_prune_evicts_least_recently_used_and_keeps_this_runs_files(tmp_path):
    cache = FeatureCache("disk", "fp", tmp_path, max_bytes=1)
    images = torch.rand(4, 3, 16, 16)
    keys = [cache.key(i) for i in images]
    cache.features(keys, lambda pos: images[pos], lambda x: x)
    for age, key in enumerate(keys):  # keys[0] oldest
        os.utime(cache._path(key), (1000 + age, 1000 + age))
    size = cache._path(keys[0]).stat().st_size
    cache.max_bytes = 2 * size + 1
    assert cache.prune(keep={keys[1]}) == 2
    assert [cache._path(k).is_file() for k in keys] == [False, True, False, True]
    assert cache.disk_bytes() <= cache.max_bytes


@pytest.mark.parametrize("choice,backbone,device,runtime,says", [
    ("auto", "litemedsam", "cpu", "onnxruntime", ""),
    ("auto", "tiny", "cpu", "torch", ""),
    ("auto", "litemedsam", "cuda", "torch", ""),
    ("torch", "litemedsam", "cpu", "torch", ""),
    ("onnxruntime", "tiny", "cpu", "onnxruntime", ""),
    ("onnxruntime", "litemedsam", "cuda", "torch", "CPU only"),
])
def test_encoder_runtime_choice(choice, backbone, device, runtime, says):
    got, why = resolve_runtime(choice, backbone, torch.device(device))
    assert got == runtime and says in why


def test_bf16_autocast_follows_the_cpu_and_can_be_off():
    assert bf16_autocast(False, torch.device("cpu")) == (False, "")
    assert bf16_autocast(True, torch.device("cuda")) == (True, "")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    used, why = bf16_autocast(True, torch.device("cpu"))
    assert used == native
    assert (why == "") == native and (native or "float32" in why)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_one_encoder_pass_gives_both_caches_the_bits_of_separate_passes(tmp_path, site, monkeypatch, runtime):
    """The job's two caches (tokens before the expert blocks, the embedding) are filled by one pass;
    its outputs must equal what the single-cut runs give, because the embedding entries are shared
    with runs of the embedding placement."""
    monkeypatch.setenv("PFEDSAM_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(overrides=["backbone=tiny", "train.device=cpu", f"train.encoder_runtime={runtime}",
                                 "lmoe.placement=blocks", "lmoe.blocks=1", "train.global_from_embedding=true"])
    trainer = SiteTrainer(cfg, "site-1", site_dir=site, workdir=tmp_path / "w")
    model = trainer.model
    cuts = (model.prefix_units, model.embedding_units)
    assert cuts[0] < cuts[1]
    images = torch.stack([trainer.datasets["train"].plain_sample(i)["image"] for i in range(3)])
    tokens, embedding = trainer.encode_cuts(images, cuts)
    assert torch.equal(tokens, trainer.encode_images(images, cuts[0]))
    assert torch.equal(embedding, trainer.encode_images(images, cuts[1]))
    assert embedding.shape[1:] == (model.mask_decoder.transformer_dim, *model.prompt_encoder.image_embedding_size)
    calls = []
    encode = trainer.encode_cuts
    monkeypatch.setattr(trainer, "encode_cuts", lambda x, c: calls.append((len(x), c)) or encode(x, c))
    fill = trainer.warm_cache()
    assert fill["encoded"] == fill["images"] and fill["computed"] == 2 * fill["images"]
    assert sum(n for n, _ in calls) == fill["images"] and {c for _, c in calls} == {cuts}


def test_onnxruntime_cache_fill_matches_torch_and_exports_once(tmp_path, site, monkeypatch):
    monkeypatch.setenv("PFEDSAM_CACHE_DIR", str(tmp_path / "cache"))
    ort = SiteTrainer(load_config(overrides=["backbone=tiny", "train.device=cpu", "train.encoder_runtime=onnxruntime"]),
                      "site-1", site_dir=site, workdir=tmp_path / "a")
    # float32 on both sides: ONNX Runtime runs the export in float32, the torch path would use bf16 on a CPU with it
    pt = SiteTrainer(load_config(overrides=["backbone=tiny", "train.device=cpu", "train.encoder_runtime=torch",
                                            "train.amp=false"]), "site-1", site_dir=site, workdir=tmp_path / "b")
    images = torch.stack([ort.datasets["train"].plain_sample(i)["image"] for i in range(3)])
    a, b = ort.encode_images(images), pt.encode_images(images)
    torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)
    exported = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    again = SiteTrainer(ort.cfg, "site-1", site_dir=site, workdir=tmp_path / "c")
    again.encode_images(images[:1])
    assert exported[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("design", [[], ["lmoe.placement=blocks", "lmoe.blocks=1", "train.global_from_embedding=true"]])
def test_feature_cache_is_per_user_reused_across_workspaces_with_progress(tmp_path, site, monkeypatch, caplog,
                                                                          design):
    """Both caches of the job's design (tokens before the expert blocks and the embedding) too."""
    monkeypatch.setenv("PFEDSAM_CACHE_DIR", str(tmp_path / "user-cache"))
    cfg = load_config(overrides=["backbone=tiny", "train.device=cpu", *design])
    assert cfg.train.cache == "disk" and cfg.train.cache_dir is None
    assert default_cache_dir() == tmp_path / "user-cache"
    with caplog.at_level(logging.INFO, logger="pfedsam"):
        first = SiteTrainer(cfg, "site-1", site_dir=site, workdir=tmp_path / "workspace-1").warm_cache(every_s=0)
    text = caplog.text
    assert str(tmp_path / "user-cache") in text and "images/s" in text and "s left" in text
    caches = 2 if "train.global_from_embedding=true" in design else 1  # computed counts each cache's entries
    assert first["computed"] == caches * first["images"] > 0
    assert first["encoded"] == first["images"]  # one encoder pass per image fills both
    second = SiteTrainer(cfg, "site-1", site_dir=site, workdir=tmp_path / "workspace-2")
    again = second.warm_cache()
    assert again["computed"] == 0 and again["images"] == first["images"]
    assert second.cache.misses == 0 and second.cache.hits > 0


@pytest.mark.parametrize("hd95_val,split,finite", [
    (False, "val", False), (True, "val", True), (False, "test", True),
])
def test_hd95_only_in_the_final_evaluation_unless_asked(tmp_path, site, hd95_val, split, finite):
    cfg = load_config(overrides=["backbone=tiny", "train.device=cpu", f"eval.hd95_val={hd95_val}"])
    result = SiteTrainer(cfg, "site-1", site_dir=site, workdir=tmp_path).evaluate(split, "global")
    assert math.isfinite(result["dice"]) and math.isfinite(result["hd95"]) == finite


@pytest.mark.parametrize("key,value", [("train.cache_dtype", "bfloat16"), ("train.encoder_runtime", "tensorrt"),
                                       ("train.cache_max_gb", -1)])
def test_bad_speed_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[f"{key}={value}"])


def test_onnx_cache_fill_follows_the_site_thread_count(tmp_path, site, monkeypatch):
    """A site re-counts its share of the cores while it fills the cache; the ONNX session must follow
    (one per thread count), or a site that started alone keeps both cores beside the next one."""
    monkeypatch.setenv("PFEDSAM_CACHE_DIR", str(tmp_path / "cache"))
    trainer = SiteTrainer(load_config(overrides=["backbone=tiny", "train.device=cpu",
                                                 "train.encoder_runtime=onnxruntime"]),
                          "site-1", site_dir=site, workdir=tmp_path / "w")
    images = torch.stack([trainer.datasets["train"].plain_sample(i)["image"] for i in range(2)])
    before = torch.get_num_threads()
    try:
        out = {}
        for n in (2, 1):
            torch.set_num_threads(n)
            out[n] = trainer.encode_images(images)
        (encoder,) = trainer._onnx.values()
        assert {n: s.get_session_options().intra_op_num_threads for n, s in encoder._sessions.items()} == {1: 1, 2: 2}
        assert torch.equal(out[1], out[2])  # the cache's bits do not depend on who filled it
    finally:
        torch.set_num_threads(before)

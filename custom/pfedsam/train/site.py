"""Training at one site: the local (personalization) phase, the global phase, evaluation.

One round of pFedSAM at a site (see design.md):
1. load G(t) from the server and L_i from the site's own state;
2. local phase: teacher = global model (experts off, frozen), student = personalized model;
   only L_i is trained, with seg + lambda_kd * T^2 * KL(teacher || student) + lambda_bal * balance;
3. evaluate personalized and global models;
4. global phase: G trained from G(t) with experts off, seg loss only; G_i(t+1) is sent.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import PFedSAMConfig, resolved_image_size
from ..data.resolve import resolve_site_dir
from ..data.sites import SiteDataset, load_split
from ..fileio import backup_path
from ..model import ParamKind, build_pfedsam, global_state, load_global_state, load_local_state, local_state
from ..model.backbones import backbone_fingerprint
from ..model.checkpoint import atomic_torch_save, non_finite, save_site_model
from .cache import FeatureCache, default_cache_dir
from .encoder_runtime import OnnxPrefixEncoder, bf16_autocast, onnx_path, resolve_runtime
from .losses import distillation_loss, proximal_term, segmentation_loss, teacher_dice
from .metrics import image_metrics, original_image_metrics, summarize
from .threads import apply_site_threads

log = logging.getLogger(__name__)

NORMALIZATION = {"litemedsam": "minmax", "tiny": "minmax", "vit_b": "sam", "vit_l": "sam", "vit_h": "sam"}


def stream_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text: stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Stream:
    """Where a phase's training batches come from.

    Each phase name has an endless sample stream per (seed, site): epoch after epoch, each a
    seeded permutation of the training images. A phase of a round reads it from ``start`` on,
    and its augmentation is seeded by (seed, site, phase, round). So the batches depend only on
    these values, never on how long the client process lived (the simulator restarts clients
    between tasks, POC and production keep them), and consecutive rounds read on where the last
    one stopped: every image is used once per epoch of the stream.

    Arguments:
      phase (str): the stream's name ("local", "global", "personal", "joint", "finetune").
      round (int): the round (seeds this round's augmentation).
      start (int): position of the first sample: samples this phase drew in earlier rounds.
    """

    phase: str
    round: int = 0
    start: int = 0


@dataclass(frozen=True)
class Features:
    """A batch's cached encoder outputs.

    Arguments:
      prefix: the frozen prefix's features, the input of every pass with the experts on (None when
        only passes without them read this batch).
      embedding: the image embedding ``(B, C, h, w)`` (``train.global_from_embedding``), the input
        of the passes with the experts off; None = those run from ``prefix`` too.
    """

    prefix: torch.Tensor | None
    embedding: torch.Tensor | None = None

    def to(self, device: torch.device) -> Features:
        return Features(*(None if t is None else t.to(device) for t in (self.prefix, self.embedding)))


def feature_grid(feats: torch.Tensor, is_embedding: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """A view of a batch of prefix features with a spatial grid, and the (row, column) dims of one sample.

    Arguments:
      feats: ``(B, C, h, w)`` when ``is_embedding``, else ``(B, h, w, C)`` or square ``(B, h*w, C)`` tokens.
    """
    if is_embedding:
        return feats, (1, 2)
    if feats.dim() == 4:
        return feats, (0, 1)
    side = math.isqrt(feats.shape[1])
    if feats.dim() != 3 or side * side != feats.shape[1]:
        raise ValueError(f"prefix features of shape {tuple(feats.shape)} have no square token grid to flip")
    return feats.view(feats.shape[0], side, side, feats.shape[2]), (0, 1)


def flip_batch(feats: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor, is_embedding: bool,
               rng: random.Random, embedding: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature-space flips (in place): each sample's prefix features, mask and box flipped together.

    Arguments:
      feats: cached prefix features, any layout ``feature_grid`` knows.
      masks: ``(B, 1, S, S)``; boxes: ``(B, 4)`` as (x0, y0, x1, y1) in pixels of S.
      rng: draws a horizontal, then a vertical flip per sample, each with probability 1/2.
      embedding: the same images' embedding ``(B, C, h, w)``, flipped with them (the draws do not
        depend on it, so the flips are those of a run without it).
    """
    size = masks.shape[-1]
    grids = [feature_grid(feats, is_embedding)]
    if embedding is not None:
        grids.append(feature_grid(embedding, True))
    for b in range(feats.shape[0]):
        if rng.random() < 0.5:
            for grid, (_, w_dim) in grids:
                grid[b] = grid[b].flip(w_dim)
            masks[b] = masks[b].flip(-1)
            boxes[b, [0, 2]] = size - boxes[b, [2, 0]]
        if rng.random() < 0.5:
            for grid, (h_dim, _) in grids:
                grid[b] = grid[b].flip(h_dim)
            masks[b] = masks[b].flip(-2)
            boxes[b, [1, 3]] = size - boxes[b, [3, 1]]
    return feats, masks, boxes


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is '{name}' but CUDA is not available on this machine")
    return torch.device(name)


class _Split:
    """A split's samples held without augmentation: cache keys, masks, boxes, valid regions.

    The masks at the original resolution (for ``eval.resolution: original``) are read on first
    use and then kept, as bool arrays.
    """

    def __init__(self, dataset: SiteDataset, cache: FeatureCache, embedding_cache: FeatureCache | None = None) -> None:
        self.dataset = dataset
        self.keys: list[str] = []
        self.embedding_keys: list[str] = []  # keys of embedding_cache (train.global_from_embedding)
        masks, boxes, valid = [], [], []
        for i in range(len(dataset)):
            sample = dataset.plain_sample(i)
            self.keys.append(cache.key(sample["image"]))
            if embedding_cache is not None:
                self.embedding_keys.append(embedding_cache.key(sample["image"]))
            masks.append(sample["mask"].to(torch.uint8))
            boxes.append(sample["box"])
            valid.append(sample["valid_hw"])
        self.masks = torch.stack(masks) if masks else torch.zeros(0)
        self.boxes = torch.stack(boxes) if boxes else torch.zeros(0, 4)
        self.valid = torch.stack(valid) if valid else torch.zeros(0, 2, dtype=torch.long)
        self._originals: dict[int, np.ndarray] = {}

    @property
    def ids(self) -> list[str]:
        return self.dataset.ids

    def original_mask(self, i: int) -> np.ndarray:
        """The truth of image ``i`` as stored on disk, ``H x W`` bool (read once, then kept)."""
        if i not in self._originals:
            self._originals[i] = self.dataset.original_mask(i)
        return self._originals[i]

    def __len__(self) -> int:
        return len(self.keys)


class SiteTrainer:
    """Everything one site does with its model and data.

    Arguments:
      cfg (PFedSAMConfig): the run settings.
      site_name (str): the site's name (FLARE client name, or a folder name locally).
      site_dir (Path|None): the site's data folder; None = resolved from ``cfg.data``.
      workdir (Path|None): where the feature cache and saved states go (default: a temp dir).
    """

    def __init__(
        self, cfg: PFedSAMConfig, site_name: str, site_dir: str | Path | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.site_name = site_name
        self.site_dir = Path(site_dir) if site_dir is not None else resolve_site_dir(cfg, site_name)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="pfedsam-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        threads = apply_site_threads(cfg.train.num_threads)
        log.info(f"{site_name}: {threads} torch thread(s) (train.num_threads: {cfg.train.num_threads or 'auto'})")
        self.device = select_device(cfg.train.device)
        self.model = build_pfedsam(cfg).to(self.device)
        self.registry = self.model.registry
        self.amp, why = bf16_autocast(cfg.train.amp, self.device)
        if why:
            log.info(why)
        self._seg = segmentation_loss(cfg.train.batch_dice)
        self.lr_scale = 1.0  # times train.lr_global/lr_local in every phase; set by lr_scaled()

        size = resolved_image_size(cfg)
        backbone = backbone_fingerprint(cfg.backbone, cfg.checkpoint, size)
        cache_dir = Path(cfg.train.cache_dir).expanduser() if cfg.train.cache_dir else default_cache_dir()

        self.encoder_runtime, why = resolve_runtime(cfg.train.encoder_runtime, cfg.backbone, self.device)
        if why:
            log.info(why)
        # Features the encoder computed under bf16 autocast are other numbers than float32 ones
        # (ONNX Runtime and torch without amp agree to 1e-4): they never share cache entries.
        fill = "-bf16" if self.encoder_runtime == "torch" and self.amp else ""

        def feature_cache(units: int) -> FeatureCache:
            return FeatureCache(cfg.train.cache, f"{backbone}-prefix{units}{fill}",
                                cache_dir if cfg.train.cache == "disk" else None,
                                dtype=cfg.train.cache_dtype, max_bytes=int(cfg.train.cache_max_gb * 1e9))

        self.cache = feature_cache(self.model.prefix_units)
        # With the experts inside the encoder, the passes without them can read the embedding instead
        # (the same cache entries as a run with the experts on the embedding).
        self.embedding_cache = (feature_cache(self.model.embedding_units)
                                if cfg.train.global_from_embedding and not self.model.prefix_is_embedding else None)
        if self.cache.mode == "disk":
            log.info(f"{site_name}: feature cache {cache_dir} ({cfg.train.cache_dtype}, bound "
                     f"{cfg.train.cache_max_gb:g} GB; train.cache_dir to move it)")
        self._onnx_dir = cache_dir if self.cache.mode == "disk" else self.workdir
        self._backbone = backbone
        self._onnx: dict[tuple[int, ...], OnnxPrefixEncoder] = {}  # per tuple of cuts exported

        split = load_split(self.site_dir, seed=cfg.train.seed, fractions=tuple(cfg.data.split_fractions))
        self.datasets: dict[str, SiteDataset] = {}
        for name in ("train", "val", "test"):
            ids = split[name]
            limit = cfg.data.max_train if name == "train" else cfg.data.max_eval
            if limit:
                ids = ids[:limit]
            self.datasets[name] = SiteDataset(
                self.site_dir, split=name, image_size=size, normalization=NORMALIZATION[cfg.backbone],
                augment=(name == "train" and cfg.data.augment), mask_convention=cfg.data.mask_convention,
                on_bad_file=cfg.data.on_bad_file, seed=cfg.train.seed,
                split_fractions=tuple(cfg.data.split_fractions), ids=ids,
            )
        self.skipped = [b for d in self.datasets.values() for b in d.skipped]
        self._splits: dict[str, _Split] = {}
        self._open_stream(Stream("default"))  # batches drawn outside a phase (benchmarks) read this stream

    # -- parameters --------------------------------------------------------------------------------------
    def global_names(self) -> list[str]:
        return self.registry.names(ParamKind.GLOBAL)

    def local_names(self) -> list[str]:
        return self.registry.names(ParamKind.LOCAL)

    def get_global_state(self) -> dict[str, np.ndarray]:
        return {k: v.float().numpy() for k, v in global_state(self.model).items()}

    def set_global_state(self, state: dict) -> None:
        load_global_state(self.model, {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})

    def get_local_state(self) -> dict[str, np.ndarray]:
        return {k: v.float().numpy() for k, v in local_state(self.model).items()}

    def set_local_state(self, state: dict) -> None:
        load_local_state(self.model, {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})

    def save_local_state(self, path: str | Path, rnd: int | None = None) -> None:
        """Write this site's L-MoE state atomically, the previous one kept as ``<path>.bak``.

        Arguments:
          path: the state file (never sent anywhere).
          rnd: the round this state completed (recorded so a resumed run never trains a round twice).
        A state with NaN/Inf is refused (ValueError) and the previous good file stays in place.
        """
        state = local_state(self.model)
        bad = non_finite(state)
        if bad:
            raise ValueError(f"refusing to save a non-finite L-MoE state ({len(bad)} tensor(s), e.g. '{bad[0]}'); "
                             f"the previous state in {path} is kept")
        atomic_torch_save({"site": self.site_name, "local": state, "round": rnd}, path, backup=True)

    def load_local_state(self, path: str | Path, before_round: int | None = None) -> bool:
        """Load the newest usable saved L-MoE state; False when none was ever saved at ``path``.

        Arguments:
          path: the state file; its backup ``<path>.bak`` is the fallback.
          before_round: only a state that completed an earlier round is usable (a state of round
            ``before_round`` or later was trained already and is skipped, so no round runs twice).
        A file that cannot be read or holds NaN/Inf is skipped (with the reason in ``state_notes``);
        when files exist but none is usable, ValueError names them.
        """
        path = Path(path)
        self.state_notes: list[str] = []
        candidates = [p for p in (path, backup_path(path)) if p.is_file()]
        for candidate in candidates:
            try:
                saved = torch.load(candidate, map_location="cpu", weights_only=True)
                state, rnd = saved["local"], saved.get("round")
            except Exception as exc:
                self.state_notes.append(f"{candidate}: unreadable ({exc})")
                continue
            if before_round is not None and rnd is not None and rnd >= before_round:
                self.state_notes.append(f"{candidate}: holds round {rnd}, already trained "
                                        f"(round {before_round} runs now)")
                continue
            if non_finite(state):
                self.state_notes.append(f"{candidate}: holds NaN/Inf")
                continue
            load_local_state(self.model, state, source=str(candidate))
            self.loaded_state_round = rnd
            return True
        if candidates:
            raise ValueError(f"no usable L-MoE state for this site: {'; '.join(self.state_notes)}")
        return False

    def save_model(self, out_dir: str | Path, meta: dict | None = None) -> Path:
        """Save the personalized model (config + global + local state) as a site model folder."""
        return save_site_model(self.model, self.cfg, out_dir, {"site": self.site_name, **(meta or {})})

    @property
    def num_train_images(self) -> int:
        return len(self.datasets["train"])

    # -- data --------------------------------------------------------------------------------------------
    def _split(self, name: str) -> _Split:
        if name not in self._splits:
            self._splits[name] = _Split(self.datasets[name], self.cache, self.embedding_cache)
        return self._splits[name]

    def _prefix(self, split: _Split, idx: list[int], embedding: bool = False) -> torch.Tensor:
        """Cached features of images ``idx``: the prefix's, or with ``embedding`` the image embedding."""
        def load(pos: list[int]) -> torch.Tensor:
            return self._images(split, [idx[p] for p in pos])

        units = self.model.embedding_units if embedding else self.model.prefix_units
        if not self.cache.enabled:
            return self.encode_images(load(list(range(len(idx)))), units)
        cache, keys = (self.embedding_cache, split.embedding_keys) if embedding else (self.cache, split.keys)
        return cache.features([keys[i] for i in idx], load, lambda x: self.encode_images(x, units),
                              self.cfg.train.batch_size, channels_last=self.cfg.train.fast_decoder)

    @staticmethod
    def _images(split: _Split, idx: list[int]) -> torch.Tensor:
        """Preprocessed, unaugmented images ``idx`` of a split (what the encoder caches)."""
        return torch.stack([split.dataset.plain_sample(i)["image"] for i in idx])

    def _features(self, split: _Split, idx: list[int], experts: bool | None = None) -> Features:
        """The cached inputs of images ``idx`` that passes with (True), without (False) or with and
        without (None) the experts read."""
        embedding = self.embedding_cache is not None and experts is not True
        prefix = experts is not False or not embedding
        return Features(self._prefix(split, idx) if prefix else None,
                        self._prefix(split, idx, embedding=True) if embedding else None)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, units: int | None = None) -> torch.Tensor:
        """Frozen prefix features of preprocessed images, by ``train.encoder_runtime`` (the cache fill).

        Arguments:
          images: preprocessed images ``(B, 3, S, S)``.
          units: encoder units to run (default: the model's prefix).
        """
        return self.encode_cuts(images, (self.model.prefix_units if units is None else units,))[0]

    @torch.no_grad()
    def encode_cuts(self, images: torch.Tensor, cuts: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """The frozen encoder's features after each of ``cuts`` (increasing unit counts), in one pass.

        Each output has the same bits as ``encode_images(images, cut)``: the runs are the same
        operations, and for ONNX Runtime a graph with several outputs computes them alike (test).
        """
        if self.encoder_runtime == "onnxruntime":
            if cuts not in self._onnx:
                name = "+".join(str(c) for c in cuts)
                self._onnx[cuts] = OnnxPrefixEncoder(
                    self.model, onnx_path(self._onnx_dir, f"{self._backbone}-prefix{name}"), self.model.image_size,
                    cuts=cuts)
            return self._onnx[cuts](images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return tuple(x.float() for x in self.model.encode_cuts(images.to(self.device), cuts))

    def warm_cache(self, splits: tuple[str, ...] = ("train", "val", "test"), every_s: float = 10.0) -> dict:
        """Compute and store the prefix features of every image in ``splits`` once.

        With ``train.global_from_embedding`` one encoder pass per image fills both caches (the
        tokens before the expert blocks and the image embedding).

        Arguments:
          splits: the splits to fill.
          every_s: seconds between progress lines (images done, images/s, time left) in the log.
        Returns ``{"images", "computed", "encoded", "seconds"}``: ``computed`` counts the entries
        written (both caches'), ``encoded`` the images run through the encoder.
        """
        if not self.cache.enabled:
            return {"images": 0, "computed": 0, "encoded": 0, "seconds": 0.0}
        start = time.perf_counter()
        total = sum(len(self._split(name)) for name in splits)
        bs = self.cfg.train.batch_size
        caches = [(self.cache, "keys", self.model.prefix_units)]
        if self.embedding_cache is not None:
            caches.append((self.embedding_cache, "embedding_keys", self.model.embedding_units))
        cuts = tuple(units for _, _, units in caches)
        what = " and ".join(("feature", "image embedding")[: len(caches)])
        todo = [(name, i) for name in splits for i in range(len(self._split(name)))
                if any(not cache.contains(getattr(self._split(name), attr)[i]) for cache, attr, _ in caches)]
        if todo:
            log.info(f"{self.site_name}: filling the {what} cache: {len(todo)} of {total} images to encode "
                     f"({self.encoder_runtime})")
        computed = 0
        last = fill_start = time.perf_counter()
        for n in range(0, len(todo), bs):
            self.share_cores()
            chunk = todo[n : n + bs]
            for name in dict.fromkeys(name for name, _ in chunk):
                split = self._split(name)
                idx = [i for nm, i in chunk if nm == name]
                feats_per_cut = self.encode_cuts(self._images(split, idx), cuts)
                for (cache, attr, _), feats in zip(caches, feats_per_cut, strict=True):
                    computed += cache.store([getattr(split, attr)[i] for i in idx], feats)
            done = n + len(chunk)
            now = time.perf_counter()
            if now - last >= every_s or done == len(todo):
                rate = done / max(now - fill_start, 1e-9)
                log.info(f"{self.site_name}: {what} cache fill {done}/{len(todo)} images, {rate:.2f} images/s, "
                         f"about {(len(todo) - done) / rate:.0f} s left")
                last = now
        for embedding in (False, True)[: len(caches)]:  # load the ones already on disk into memory
            for name in splits:
                split = self._split(name)
                for begin in range(0, len(split), bs):
                    self._prefix(split, list(range(begin, min(begin + bs, len(split)))), embedding)
        # one bound for the folder both caches share: neither may evict this run's entries of the other
        keep = {k for name in splits for k in (*self._split(name).keys, *self._split(name).embedding_keys)}
        self.cache.prune(keep=keep)
        return {"images": total, "computed": computed, "encoded": len(todo), "seconds": time.perf_counter() - start}

    def _open_stream(self, stream: Stream) -> None:
        """Position the batch order and seed the augmentation for one phase of one round."""
        seed = stream_seed(self.cfg.train.seed, self.site_name, stream.phase, "round", stream.round)
        self._stream, self._pos = stream, stream.start
        self._epoch: tuple[int, list[int]] = (-1, [])
        self._rng = random.Random(seed)  # feature-space flips
        self._gen = torch.Generator().manual_seed(seed)  # box jitter
        self.datasets["train"].reseed(seed % 2**32)  # image-space augmentation (no cache)

    def _next_indices(self, n: int, total: int) -> list[int]:
        """The next ``n`` training indices of the open stream (epochs of seeded permutations)."""
        out = []
        for _ in range(n):
            epoch, k = divmod(self._pos, total)
            if self._epoch[0] != epoch:
                gen = torch.Generator().manual_seed(
                    stream_seed(self.cfg.train.seed, self.site_name, self._stream.phase, "epoch", epoch))
                self._epoch = (epoch, torch.randperm(total, generator=gen).tolist())
            out.append(self._epoch[1][k])
            self._pos += 1
        return out

    def _train_batch(self) -> tuple[Features, torch.Tensor, torch.Tensor]:
        """(cached features, masks, boxes) of the next training batch, augmented."""
        split = self._split("train")
        if len(split) == 0:
            raise RuntimeError(f"site '{self.site_name}' has no training images in {self.site_dir}")
        idx = self._next_indices(self.cfg.train.batch_size, len(split))
        if self.cache.enabled:
            feats = self._features(split, idx)
            masks = split.masks[idx].float()
            boxes = split.boxes[idx].clone()
            if self.cfg.data.augment:
                flip_batch(feats.prefix, masks, boxes, self.model.prefix_is_embedding, self._rng, feats.embedding)
        else:  # image-space augmentation, full encoder pass every step
            samples = [split.dataset[i] for i in idx]
            images = torch.stack([s["image"] for s in samples]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                feats = Features(self.model.encode_prefix(images).float())
            masks = torch.stack([s["mask"] for s in samples])
            boxes = torch.stack([s["box"] for s in samples])
        if self.cfg.prompt == "box":
            boxes = self._jitter(boxes)
        return feats.to(self.device), masks.to(self.device), boxes.to(self.device)

    def _jitter(self, boxes: torch.Tensor) -> torch.Tensor:
        """Box prompts in training: each side moved by up to 10% of the box size."""
        w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
        h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
        noise = (torch.rand(boxes.shape, generator=self._gen) * 2 - 1) * 0.1
        scale = torch.stack([w, h, w, h], dim=1)
        size = self.model.image_size
        return (boxes + noise * scale).clamp(0, size)

    # -- phases ------------------------------------------------------------------------------------------
    def share_cores(self) -> None:
        """Re-count the site processes on this host before each step and batch scored (a file listing).

        Checked only once per phase, a site that started a moment before the next simulator
        client kept every core through its phase while the other took its share: 3 threads on 2
        cores, and that site's round took 55 s instead of about 30 (the README's job). A step's
        numbers do not depend on the thread count (``pfedsam.model.norm``).
        """
        if self.device.type == "cpu":
            apply_site_threads(self.cfg.train.num_threads)

    def _run(
        self, phase: str, steps: int, trainable: set[ParamKind], loss_fn: Callable,
        abort: Callable[[], bool] | None, stream: Stream | None = None,
    ) -> dict[str, float]:
        self._open_stream(stream or Stream(phase))
        self.registry.set_trainable(self.model, trainable)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if steps <= 0 or not params:
            self.registry.set_trainable(self.model, set())
            return {"steps": 0, "images": 0, "loss": float("nan"), "seconds": 0.0}
        by_kind: dict[ParamKind, list[torch.nn.Parameter]] = {}
        for kind in (ParamKind.GLOBAL, ParamKind.LOCAL):
            names = set(self.registry.names(kind))
            by_kind[kind] = [p for n, p in self.model.named_parameters() if n in names and p.requires_grad]
        lrs = {ParamKind.GLOBAL: self.cfg.train.lr_global * self.lr_scale,
               ParamKind.LOCAL: self.cfg.train.lr_local * self.lr_scale}
        groups = [{"params": ps, "lr": lrs[kind]} for kind, ps in by_kind.items() if ps]
        opt = torch.optim.AdamW(groups, weight_decay=self.cfg.train.weight_decay)
        self.model.train()
        totals: dict[str, float] = {}
        done = 0
        start = time.perf_counter()
        for _ in tqdm(range(steps), desc=f"{self.site_name} {phase}", disable=None, leave=False):
            if abort is not None and abort():
                break
            self.share_cores()
            feats, masks, boxes = self._train_batch()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                parts = loss_fn(feats, masks, boxes)
            opt.zero_grad(set_to_none=True)
            if "local_loss" in parts:  # concurrent: each part learns from its own loss and is clipped alone
                parts["local_loss"].backward(inputs=by_kind[ParamKind.LOCAL], retain_graph=True)
                parts["loss"].backward(inputs=by_kind[ParamKind.GLOBAL])
                clip_sets = [ps for ps in by_kind.values() if ps]
            else:
                parts["loss"].backward()
                clip_sets = [params]
            if self.cfg.train.grad_clip:
                for ps in clip_sets:
                    torch.nn.utils.clip_grad_norm_(ps, self.cfg.train.grad_clip)
            opt.step()
            done += 1
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
        self.model.eval()
        self.registry.set_trainable(self.model, set())
        out = {k: v / max(done, 1) for k, v in totals.items()}
        out.update(steps=done, images=done * self.cfg.train.batch_size, seconds=time.perf_counter() - start)
        return out

    def _logits(self, feats: Features, boxes: torch.Tensor, experts: bool) -> torch.Tensor:
        """Mask logits with the experts on (from the prefix) or off (from the embedding when cached)."""
        if not experts and feats.embedding is not None:
            return self.model.decode(feats.embedding, boxes)
        return self.model.forward_from_prefix(feats.prefix, boxes, use_experts=experts)

    def local_loss(self, feats: Features, masks: torch.Tensor, boxes: torch.Tensor,
                   teacher: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """seg(student) + lambda_kd * T^2 * KL(teacher || student) + lambda_bal * balance.

        KD is off before round ``train.kd_start_round``; with ``train.kd_gate: teacher_dice`` each
        image's KL is weighted by the teacher's Dice on it. ``teacher``: the global model's logits
        on this batch when the caller has them (detached), else they are computed here.
        """
        t = self.cfg.train
        student = self._logits(feats, boxes, experts=True).float()
        parts = {"seg": self._seg(student, masks), "balance": self.model.balance_loss().to(student.device)}
        if t.kd_weight > 0 and self._stream.round >= t.kd_start_round:
            if teacher is None:
                with torch.no_grad():
                    teacher = self._logits(feats, boxes, experts=False).float()
            gate = teacher_dice(teacher, masks, self.cfg.eval.threshold) if t.kd_gate == "teacher_dice" else None
            parts["kd"] = distillation_loss(student, teacher, t.kd_temperature, gate)
        else:
            parts["kd"] = torch.zeros((), device=student.device)
        parts["loss"] = parts["seg"] + t.kd_weight * parts["kd"] + t.balance_weight * parts["balance"]
        return parts

    def run_local_phase(self, steps: int | None = None, abort: Callable[[], bool] | None = None,
                        stream: Stream | None = None) -> dict:
        """Personalize: train only the local part (L-MoE, or FedRep's head), distilling from the global model."""
        if not self.model.has_local:
            return {"steps": 0, "images": 0, "loss": float("nan"), "seconds": 0.0}
        n = self.cfg.train.local_steps if steps is None else steps
        return self._run("local", n, {ParamKind.LOCAL}, self.local_loss, abort, stream)

    def _anchored_loss(self, weight: float) -> Callable:
        """Seg loss of the global model (experts off) + weight * 0.5 ||w - w_now||^2 (FedProx, Ditto).

        The anchor is the value of the global parameters when this is called.
        """
        names = set(self.global_names())
        anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in names} if weight else {}

        def loss(feats: Features, masks: torch.Tensor, boxes: torch.Tensor,
                 logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            if logits is None:
                logits = self._logits(feats, boxes, experts=False).float()
            parts = {"seg": self._seg(logits, masks)}
            parts["loss"] = parts["seg"]
            if weight:
                current = {n: p for n, p in self.model.named_parameters() if n in names}
                parts["prox"] = proximal_term(current, anchor)
                parts["loss"] = parts["loss"] + weight * parts["prox"]
            return parts

        return loss

    def run_global_phase(self, steps: int | None = None, abort: Callable[[], bool] | None = None,
                         stream: Stream | None = None) -> dict:
        """Fine-tune the global parameters from G(t) with experts off (seg loss, + FedProx if set)."""
        n = self.cfg.train.global_steps if steps is None else steps
        return self._run("global", n, {ParamKind.GLOBAL}, self._anchored_loss(self.cfg.train.prox_mu), abort,
                         stream)

    @contextmanager
    def global_swapped(self, state: dict | None) -> Iterator[None]:
        """Temporarily load another value of the global parameters (Ditto's personal copy); None = no swap."""
        if state is None:
            yield
            return
        saved = self.get_global_state()
        self.set_global_state(state)
        try:
            yield
        finally:
            self.set_global_state(saved)

    @contextmanager
    def lr_scaled(self, scale: float) -> Iterator[None]:
        """Multiply ``train.lr_global``/``lr_local`` by ``scale`` in the phases run inside (the final lr search)."""
        previous, self.lr_scale = self.lr_scale, float(scale)
        try:
            yield
        finally:
            self.lr_scale = previous

    def run_personal_phase(
        self, personal: dict, steps: int | None = None, abort: Callable[[], bool] | None = None,
        stream: Stream | None = None,
    ) -> tuple[dict[str, np.ndarray], dict]:
        """Ditto: train a personal copy of the global parameters toward the current G(t).

        Arguments:
          personal: the site's personal copy (global parameter names -> arrays).
          steps: optimizer steps (default ``train.local_steps``).
        Loss: seg + ``ditto_lambda`` * 0.5 ||v - G(t)||^2. Returns the updated copy and the
        phase stats; the model's global parameters are G(t) again afterwards.
        """
        loss = self._anchored_loss(self.cfg.train.ditto_lambda)  # anchored at G(t), loaded now
        n = self.cfg.train.local_steps if steps is None else steps
        with self.global_swapped(personal):
            stats = self._run("personal", n, {ParamKind.GLOBAL}, loss, abort, stream)
            personal = self.get_global_state()
        return personal, stats

    def run_joint_phase(self, steps: int | None = None, abort: Callable[[], bool] | None = None,
                        stream: Stream | None = None) -> dict:
        """Ablation: global and local trained together on seg + balance (FedRep/FedPer-style)."""
        bal = self.cfg.train.balance_weight

        def loss(feats: Features, masks: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self._logits(feats, boxes, experts=True).float()
            parts = {"seg": self._seg(logits, masks), "balance": self.model.balance_loss().to(logits.device)}
            parts["loss"] = parts["seg"] + bal * parts["balance"]
            return parts

        n = (self.cfg.train.local_steps + self.cfg.train.global_steps) if steps is None else steps
        return self._run("joint", n, {ParamKind.GLOBAL, ParamKind.LOCAL}, loss, abort, stream)

    def run_concurrent_phase(self, steps: int | None = None, abort: Callable[[], bool] | None = None,
                             stream: Stream | None = None) -> dict:
        """Both parts every step, each on its own loss (``train.schedule: concurrent``).

        The global parameters learn from the global model's loss (experts off, as in the global
        phase); the L-MoE learns from ``local_loss`` with that same pass, detached, as its teacher.
        Neither loss reaches the other part's parameters, and each part's gradient is clipped
        alone, so the global parameters move exactly as in a global phase of the same length:
        personalizing no longer takes optimizer steps from the global model. A step costs about
        a local plus a global step, less one teacher pass.
        """
        global_loss = self._anchored_loss(self.cfg.train.prox_mu)

        def loss(feats: Features, masks: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
            teacher = self._logits(feats, boxes, experts=False).float()
            parts = global_loss(feats, masks, boxes, logits=teacher)
            local = self.local_loss(feats, masks, boxes, teacher=teacher.detach())
            parts.update(kd=local["kd"], balance=local["balance"], local_loss=local["loss"])
            return parts

        n = (self.cfg.train.local_steps + self.cfg.train.global_steps) if steps is None else steps
        return self._run("concurrent", n, {ParamKind.GLOBAL, ParamKind.LOCAL}, loss, abort, stream)

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_logits(self, split: str, idx: list[int], which: str = "personalized") -> torch.Tensor:
        s = self._split(split)
        experts = which == "personalized"
        feats = self._features(s, idx, experts).to(self.device)
        boxes = s.boxes[idx].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self._logits(feats, boxes, experts).float()

    @torch.no_grad()
    def evaluate(self, split: str = "val", which: str = "personalized", per_image: bool = False) -> dict[str, Any]:
        """Dice / HD95 of the personalized (experts on) or global (experts off) model on a split.

        Scored at the original resolution with ``eval.resolution: original`` (the validation split
        only with ``eval.resolution_val``), else at model resolution; HD95 on the validation
        split only with ``eval.hd95_val`` (it is the per-round evaluation).

        Arguments:
          split: ``train``, ``val`` or ``test``.
          which: ``personalized`` or ``global``.
          per_image: also return ``images``: ``[{"id", "dice", "hd95", "truth_empty", "pred_empty",
            "pred_area"}]`` in split order (local analysis only; never sent over FLARE, whose final
            result allows scalars only).
        Returns the ``summarize`` keys (``n``, ``n_empty``, ``dice``, ``hd95``, ``n_fg``, ``dice_fg``,
        ``empty_fp``), plus ``images`` with ``per_image``.
        """
        if which not in ("personalized", "global"):
            raise ValueError(f"which must be 'personalized' or 'global', got {which!r}")
        s = self._split(split)
        self.model.eval()
        rows = []
        bs = self.cfg.train.batch_size
        ev = self.cfg.eval
        hd95 = ev.hd95 and (split != "val" or ev.hd95_val)
        original = ev.resolution == "original" and (split != "val" or ev.resolution_val)
        for start in range(0, len(s), bs):
            self.share_cores()
            idx = list(range(start, min(start + bs, len(s))))
            logits = self.predict_logits(split, idx, which)
            if original:
                for j, i in enumerate(idx):
                    valid = tuple(s.valid[i].tolist())
                    rows.append(original_image_metrics(logits[j], valid, s.original_mask(i), ev.threshold, hd95))
                continue
            probs = torch.sigmoid(logits).cpu()
            for j, i in enumerate(idx):
                pred = probs[j, 0] > ev.threshold
                rows.append(image_metrics(pred, s.masks[i, 0], tuple(s.valid[i].tolist()), hd95))
        out: dict[str, Any] = summarize(rows, ev.empty_dice)
        if per_image:
            out["images"] = [{"id": s.ids[i], "dice": r["dice"], "hd95": r.get("hd95", float("nan")),
                              "truth_empty": bool(r["truth_empty"]), "pred_empty": bool(r["pred_empty"]),
                              "pred_area": r["pred_area"]}
                             for i, r in enumerate(rows)]
        return out

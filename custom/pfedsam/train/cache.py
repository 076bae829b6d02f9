"""Cache of the frozen encoder prefix's features, keyed by image content and backbone.

The prefix (every encoder unit in front of the first adapter) is frozen and deterministic,
so its output for a given preprocessed image never changes: computing it once per image
removes most of the encoder's cost from every training step. The key hashes the
preprocessed image tensor together with the backbone fingerprint (name, input size,
checkpoint digest) and the prefix length, so a cache folder can be shared by every method,
round and site without ever serving stale features. By default the disk cache lives in one
per-user folder (``~/.cache/pfedsam/features``, or ``$PFEDSAM_CACHE_DIR``), so a second job,
workspace or benchmark on the same images reads it instead of running the encoder again; its
size is bounded by evicting the least recently used files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.checkpoint import atomic_torch_save

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def default_cache_dir() -> Path:
    """The per-user feature cache folder: ``$PFEDSAM_CACHE_DIR`` or ``~/.cache/pfedsam/features``."""
    return Path(os.environ.get("PFEDSAM_CACHE_DIR") or "~/.cache/pfedsam/features").expanduser()


class FeatureCache:
    """Memory or disk cache of prefix features.

    Arguments:
      mode (str): ``memory``, ``disk`` (also kept in memory once read) or ``none``.
      fingerprint (str): identifies the frozen weights and the prefix cut.
      directory (Path|None): folder of the disk cache (required for ``disk``).
      dtype (str): ``float32`` or ``float16``: how features are stored (memory and disk);
        ``features`` always returns float32. Part of the key, so the two never mix.
      max_bytes (int): bound of the disk folder; ``prune`` evicts the least recently used
        files above it (0 = no bound).
    """

    def __init__(
        self, mode: str, fingerprint: str, directory: str | Path | None = None, dtype: str = "float32",
        max_bytes: int = 0,
    ) -> None:
        if mode not in ("memory", "disk", "none"):
            raise ValueError(f"cache mode must be memory, disk or none, got {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("cache mode 'disk' needs a directory")
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.mode = mode
        self.dtype = DTYPES[dtype]
        self.fingerprint = fingerprint if dtype == "float32" else f"{fingerprint}-{dtype}"
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.max_bytes = int(max_bytes)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def key(self, image: torch.Tensor) -> str:
        h = hashlib.sha1(self.fingerprint.encode())
        h.update(str(tuple(image.shape)).encode())
        h.update(image.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.pt"

    def _read(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        if self.mode == "disk":
            path = self._path(key)
            if path.is_file():
                try:
                    value = torch.load(path, map_location="cpu", weights_only=True)
                    os.utime(path)  # recency for the size bound's eviction order
                except Exception:  # a torn or foreign file: recompute rather than fail
                    return None
                if not isinstance(value, torch.Tensor) or value.dtype != self.dtype:
                    return None
                self._memory[key] = value
                return value
        return None

    def contains(self, key: str) -> bool:
        """True when ``key`` is in memory or on disk (nothing is loaded)."""
        return key in self._memory or (self.mode == "disk" and self._path(key).is_file())

    def disk_bytes(self) -> int:
        """Total size of the disk folder's feature files (0 for a memory cache)."""
        if self.mode != "disk" or not self.directory.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.directory.glob("*/*.pt"))

    def prune(self, keep: set[str] = frozenset()) -> int:
        """Evict least recently used disk files until the folder is under ``max_bytes``.

        Arguments:
          keep: keys never evicted (this run's images), even above the bound.
        Returns the number of files removed. Files of other backbones and jobs share the bound.
        """
        if self.mode != "disk" or not self.max_bytes or not self.directory.is_dir():
            return 0
        files = []
        for p in self.directory.glob("*/*.pt"):
            try:
                st = p.stat()
            except FileNotFoundError:  # removed by a concurrent prune
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(f[1] for f in files)
        removed = 0
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path.stem in keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        if removed:
            log.info(f"feature cache {self.directory}: evicted {removed} least recently used file(s) to stay "
                     f"under {self.max_bytes / 1e9:.1f} GB")
        return removed

    def _write(self, key: str, value: torch.Tensor) -> None:
        self._memory[key] = value
        if self.mode == "disk":  # atomic: concurrent readers never see a partial file
            atomic_torch_save(value, self._path(key))

    def features(
        self,
        keys: list[str],
        load_images: Callable[[list[int]], torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int = 4,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """Stacked float32 features for ``keys``; missing ones are computed in batches and stored.

        Arguments:
          keys: cache keys, one per image (from ``key``).
          load_images: positions in ``keys`` -> preprocessed image batch.
          encode: image batch -> prefix features (on any device; stored on the CPU).
          batch_size: images per encoder call for the missing ones.
          channels_last: image embeddings ``(B, C, h, w)`` in channels-last memory (the same
            values; the decoder and a neck L-MoE then read them as tokens without a transposing
            copy). Features of other ranks are returned contiguous.
        """
        found = [self._read(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            self.store([keys[i] for i in chunk], encode(load_images(chunk)))
            for i in chunk:
                found[i] = self._memory[keys[i]]
        stacked = torch.stack(found)  # type: ignore[arg-type]
        if channels_last and stacked.dim() == 4:  # one copy: the dtype and the layout together
            return stacked.to(torch.float32, memory_format=torch.channels_last)
        return stacked.float()

    def store(self, keys: list[str], feats: torch.Tensor) -> int:
        """Store ``feats`` (one row per key) under the keys not cached yet; returns how many were written.

        Readable entries already cached are kept as they are (recomputing one gives the same
        bits; rewriting it would only cost disk writes); a torn or foreign file is replaced.
        """
        feats = feats.detach().cpu().to(self.dtype)
        written = 0
        for key, f in zip(keys, feats, strict=True):
            if self._read(key) is None:
                self._write(key, f.clone())
                written += 1
        return written

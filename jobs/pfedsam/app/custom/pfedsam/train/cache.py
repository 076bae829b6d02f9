"""Cache of the frozen encoder prefix's features, keyed by image content and backbone.

The prefix (every encoder unit in front of the first adapter) is frozen and deterministic,
so its output for a given preprocessed image never changes: computing it once per image
removes most of the encoder's cost from every training step. The key hashes the
preprocessed image tensor together with the backbone fingerprint (name, input size,
checkpoint digest) and the prefix length, so a cache folder can be shared by every method,
round and site without ever serving stale features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from ..model.checkpoint import atomic_torch_save


class FeatureCache:
    """Memory or disk cache of prefix features.

    Arguments:
      mode (str): ``memory``, ``disk`` (also kept in memory once read) or ``none``.
      fingerprint (str): identifies the frozen weights and the prefix cut.
      directory (Path|None): folder of the disk cache (required for ``disk``).
    """

    def __init__(self, mode: str, fingerprint: str, directory: str | Path | None = None) -> None:
        if mode not in ("memory", "disk", "none"):
            raise ValueError(f"cache mode must be memory, disk or none, got {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("cache mode 'disk' needs a directory")
        self.mode = mode
        self.fingerprint = fingerprint
        self.directory = Path(directory).expanduser() if directory is not None else None
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
                except Exception:  # a torn or foreign file: recompute rather than fail
                    return None
                self._memory[key] = value
                return value
        return None

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
    ) -> torch.Tensor:
        """Stacked features for ``keys``; missing ones are computed in batches and stored.

        Arguments:
          keys: cache keys, one per image (from ``key``).
          load_images: positions in ``keys`` -> preprocessed image batch.
          encode: image batch -> prefix features (on any device; stored on the CPU).
          batch_size: images per encoder call for the missing ones.
        """
        found = [self._read(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            feats = encode(load_images(chunk)).detach().cpu()
            for i, f in zip(chunk, feats, strict=True):
                found[i] = f.clone()
                self._write(keys[i], found[i])
        return torch.stack(found)  # type: ignore[arg-type]

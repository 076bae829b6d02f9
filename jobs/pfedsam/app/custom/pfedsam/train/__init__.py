"""Training layer: losses, metrics, the prefix feature cache, the per-site trainer, rounds and their budget."""

from .cache import FeatureCache
from .losses import distillation_loss, segmentation_loss
from .metrics import image_metrics, summarize
from .rounds import RoundResult, StepPlan, evaluate_both, plan_steps, run_final, run_round
from .site import SiteTrainer, Stream, select_device

__all__ = ["FeatureCache", "RoundResult", "SiteTrainer", "StepPlan", "Stream", "distillation_loss", "evaluate_both",
           "image_metrics", "plan_steps", "run_final", "run_round", "segmentation_loss", "select_device",
           "summarize"]

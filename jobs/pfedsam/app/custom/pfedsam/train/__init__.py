"""Training layer: losses, metrics, the prefix feature cache and the per-site trainer."""

from .cache import FeatureCache
from .losses import distillation_loss, segmentation_loss
from .metrics import image_metrics, summarize
from .site import SiteTrainer, select_device

__all__ = ["FeatureCache", "SiteTrainer", "distillation_loss", "image_metrics", "segmentation_loss",
           "select_device", "summarize"]

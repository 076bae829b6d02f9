"""pFedSAM-FLARE: personalized federated fine-tuning of the Segment Anything Model.

Layers, lowest first: ``model`` and ``data``; ``train`` on them; ``flare`` (the only
module that imports nvflare) on ``train``; ``export`` and ``cli`` on top.
"""

__version__ = "0.1.0"

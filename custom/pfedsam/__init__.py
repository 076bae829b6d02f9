"""pFedSAM-FLARE: personalized federated fine-tuning of the Segment Anything Model.

Layers, lowest first (a module imports only from its own layer and the ones below;
``tests/test_layers.py`` checks it):

1. ``config``, ``fileio``, ``jobs`` (job folders; no torch, no nvflare);
2. ``model`` and ``data``;
3. ``train`` (one site's training, evaluation, feature cache);
4. ``export`` (ONNX/TensorRT export and ``predict`` of a site model; no FLARE);
5. ``flare`` (the only layer importing nvflare: executor, workflows, aggregator, filters,
   persistor, report, admin), which calls ``train`` each round and ``export`` at the end;
6. ``cli`` (the ``pfedsam`` command).
"""

__version__ = "0.1.0"

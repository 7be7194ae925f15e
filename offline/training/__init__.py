"""Fine-tuning EfficientNet-Lite0 for same-product similarity (issue 4, training part).

    python -m offline.training.train --data ../shared/datasets/grocery [--epochs N] [--out NAME]

Modules: ``data`` (GroceryStore reader, P×K sampler, augmentation incl. catalog→shop synthesis),
``model`` (backbone + GeM + projection + coarse head), ``losses`` (CosFace/ArcFace, batch-hard triplet),
``evaluate`` (brute-force cosine retrieval metrics, fused coarse accuracy), ``export`` (ONNX + check +
registry), ``train`` (the CLI).
"""

"""The deep-feature side of deepfeat: model registry, layer selection, pooling, the Embedder, image loading.

Knows torch, torchvision, timm and PIL; never imports ``index`` or ``app``.
"""

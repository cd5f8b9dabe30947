"""Model zoo: CIFAR-style teachers and students behind one registry and one interface."""

from __future__ import annotations

# Importing the family modules registers their models.
from dskd.models import mobilenetv2, resnet_cifar, shufflenetv2, vgg, wrn  # noqa: F401
from dskd.models.base import FeatureClassifier
from dskd.models.profile import count_macs, count_params
from dskd.models.registry import create_model, list_models, register_model

__all__ = [
    "FeatureClassifier",
    "count_macs",
    "count_params",
    "create_model",
    "list_models",
    "register_model",
]

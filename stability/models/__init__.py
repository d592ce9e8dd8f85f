"""Architectures, their construction and initialization, and the model table.

- ``zoo``: the networks (LeNet-300-100, MLP, LeNet-5, Conv-2/4/6, CIFAR ResNet, VGG, MobileNetV1) and
  their builders;
- ``noise``: per-member training noise (``NoiseDropout`` and the generator the training loop puts in
  place, which strong tickets' sampled supermasks also draw from);
- ``build``: ``MODELS`` (one ``ModelSpec`` per name), ``build_model``, ``register_model`` and
  what the suite reads off a built model;
- ``external``: the ``torchvision/*`` and ``timm/*`` adapters (the libraries are imported when named).

Import from this package, not its modules; the modules import each other, never this face.
"""

from __future__ import annotations

from .build import (
    BN_INITS,
    INIT_SCHEMES,
    MODELS,
    STEMS,
    TIMM_PREFIX,
    TORCHVISION_PREFIX,
    ModelSpec,
    build_model,
    count_parameters,
    has_batchnorm,
    model_spec,
    output_layer_name,
    register_model,
)
from .noise import NoiseDropout, dropout_noise, has_dropout, noise_generator
from .zoo import (
    RESNET_DEPTHS,
    CifarResNet,
    CifarVGG,
    ConvThenFC,
    DepthwiseSeparable,
    FullyConnected,
    MaxPool2d,
    MobileNetV1,
    ResidualBlock,
)

__all__ = [
    "BN_INITS", "INIT_SCHEMES", "MODELS", "RESNET_DEPTHS", "STEMS", "TIMM_PREFIX", "TORCHVISION_PREFIX",
    "CifarResNet", "CifarVGG", "ConvThenFC", "DepthwiseSeparable", "FullyConnected", "MaxPool2d",
    "MobileNetV1", "ModelSpec", "NoiseDropout", "ResidualBlock",
    "build_model", "count_parameters", "dropout_noise", "has_batchnorm", "has_dropout", "model_spec",
    "noise_generator", "output_layer_name", "register_model",
]

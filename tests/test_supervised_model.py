"""The supervised UML model and loss (plain PyTorch)."""

import math

import torch
import torch.nn.functional as F

from uml_ray.models.supervised import SharedHeadUML, uml_loss
from uml_ray.train.common import warmup_cosine


def test_reference_layout_target_projected_text_straight_in():
    model = SharedHeadUML({"image": 20, "text": 12}, "image", num_classes=4)
    assert model.shared_dim == 12
    assert isinstance(model.projections["image"], torch.nn.Linear) and model.projections["image"].bias is None
    assert isinstance(model.projections["text"], torch.nn.Identity)
    assert model.head.weight.shape == (4, 12) and model.head.bias is None
    projected = SharedHeadUML({"image": 20, "text": 12, "audio": 7}, "image", 4, project_auxiliary=True)
    assert isinstance(projected.projections["text"], torch.nn.Linear)
    assert isinstance(projected.projections["audio"], torch.nn.Linear)


def test_loss_is_target_ce_plus_alpha_weighted_auxiliary_ce():
    torch.manual_seed(0)
    model = SharedHeadUML({"image": 6, "text": 5, "audio": 5}, "image", 3)
    batches = {"image": torch.randn(4, 6), "text": torch.randn(7, 5), "audio": torch.randn(2, 5)}
    labels = {
        "image": torch.tensor([0, 1, 2, 0]),
        "text": torch.randint(0, 3, (7,)),
        "audio": torch.tensor([1, 2]),
    }
    logits = model(batches)
    total, parts = uml_loss(logits, labels, "image", {"text": 0.5, "audio": 2.0})
    expected = sum(
        F.cross_entropy(logits[m], labels[m]) * w for m, w in [("image", 1.0), ("text", 0.5), ("audio", 2.0)]
    )
    assert torch.allclose(total, expected)
    assert set(parts) == {"image", "text", "audio"}
    alone, _ = uml_loss({"image": logits["image"]}, labels, "image", {})
    assert torch.allclose(alone, F.cross_entropy(logits["image"], labels["image"]))


def test_head_init_from_class_means_and_logit_scale():
    model = SharedHeadUML({"image": 6, "text": 3}, "image", 3, logit_scale=True)
    features = torch.tensor([[2.0, 0, 0], [4.0, 0, 0], [0, 3.0, 0]])
    before = model.head.weight[2].clone()
    model.init_head_from_class_means(features, torch.tensor([0, 0, 1]))
    assert torch.allclose(model.head.weight[0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(model.head.weight[1], torch.tensor([0, 1.0, 0]))
    assert torch.equal(model.head.weight[2], before)  # a class without text keeps its init
    with torch.no_grad():
        model.log_scales["text"].fill_(math.log(3.0))
    assert torch.allclose(model.logits("text", features), 3.0 * model.head(features))


def test_warmup_then_cosine_schedule():
    factor = warmup_cosine(10, 110)
    assert factor(0) == 0.1 and factor(9) == 1.0
    assert factor(10) == 1.0 and abs(factor(60) - 0.5) < 1e-9 and factor(110) == 0.0

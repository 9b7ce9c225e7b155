import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common import metrics, privacy, training
from common.models import build_model


def test_unet_dp_step_runs_and_clips():
    torch.manual_seed(0)
    model = build_model("segmentation", "unet", image_size=32)
    x = torch.rand(4, 1, 32, 32)
    y = (torch.rand(4, 32, 32) > 0.8).long()
    dp = privacy.DPPlan(noise_multiplier=1.0, sample_rate=1.0, max_grad_norm=0.5, delta=1e-5, planned_steps=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    engine, module, optimizer, loader = privacy.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader, dp)
    optimizer.zero_grad()
    training.dice_ce_loss(module(x), y).backward()
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], dim=1)
    assert per_sample.shape[0] == 4 and (per_sample.norm(dim=1) > 0.5).all()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert len(engine.accountant.history) == 1


def test_dice_ce_loss_decomposes_by_sample():
    logits = torch.randn(3, 2, 8, 8)
    target = (torch.rand(3, 8, 8) > 0.5).long()
    whole = training.dice_ce_loss(logits, target)
    parts = torch.stack([training.dice_ce_loss(logits[i : i + 1], target[i : i + 1]) for i in range(3)])
    assert torch.allclose(whole, parts.mean(), atol=1e-6)


def test_dice_and_iou_match_counts():
    pred = torch.tensor([[[1, 1], [0, 0]]])
    target = torch.tensor([[[1, 0], [1, 0]]])
    out = metrics.segmentation(pred, target, num_classes=2)
    assert abs(out["dice"] - 0.5) < 1e-6 and abs(out["iou"] - 1 / 3) < 1e-6
    assert F.one_hot(target).shape[-1] == 2

"""The box losses against torch / torchvision computed independently."""

import torch
from torchvision.ops import generalized_box_iou_loss

from medisee.model.losses import box_loss


def random_boxes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, 2, generator=gen) * 0.6
    size = torch.rand(n, 2, generator=gen) * 0.4 + 0.01
    return torch.cat([lo, lo + size], -1)


def test_box_l1_mean_over_boxes_equals_nn_l1loss():
    pred, true = random_boxes(7, 0), random_boxes(7, 1)
    l1, _ = box_loss(pred, true)
    assert l1.shape == (7,)
    torch.testing.assert_close(l1.mean(), torch.nn.L1Loss()(pred, true))
    for i in range(7):
        torch.testing.assert_close(l1[i], torch.nn.L1Loss()(pred[i], true[i]))


def test_box_giou_is_torchvision_generalized_box_iou_loss_per_box():
    pred, true = random_boxes(7, 2), random_boxes(7, 3)
    _, giou = box_loss(pred, true)
    torch.testing.assert_close(giou, generalized_box_iou_loss(pred, true, reduction="none"))
    torch.testing.assert_close(giou.mean(), generalized_box_iou_loss(pred, true, reduction="mean"))
    same = box_loss(true, true)
    assert torch.allclose(same[0], torch.zeros(7)) and torch.allclose(same[1], torch.zeros(7), atol=1e-4)


def test_box_losses_on_hand_computed_pairs():
    pred = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.1, 0.1]])
    true = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.1, 0.0, 0.2, 0.1]])
    l1, giou = box_loss(pred, true)
    torch.testing.assert_close(l1, torch.tensor([0.1, 0.05]))
    # I = 0.01, U = 0.07, enclosing 0.09: GIoU = 1/7 - 2/9; touching boxes: IoU 0, GIoU 0
    torch.testing.assert_close(giou, torch.tensor([1 - (1 / 7 - 2 / 9), 1.0]))

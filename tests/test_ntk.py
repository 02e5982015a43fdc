"""nbutils.nas.ntk pieces that TE-NAS adds to (the known-answer NTK and region tests live in
test_zero_cost.py): crops normalised from pixel values, and measurements that leave an
eval-mode network with running statistics exactly as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nbutils.nas.ntk import linear_regions, ntk_condition_number, region_inputs


def test_region_inputs_normalise_each_crop_with_its_channel():
    # channel c of every image holds the constant 10 * (c + 1): each crop is constant, and its
    # value tells which channel it was cut from
    images = torch.stack([torch.full((5, 6), 10 * (c + 1), dtype=torch.uint8) for c in range(3)]).repeat(4, 1, 1, 1)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    expected = {round((10 * (c + 1) / 255 - mean[c]) / std[c], 5) for c in range(3)}
    batches = region_inputs(images, num_batches=2, batch_size=50, crop=3,
                            generator=torch.Generator().manual_seed(0), mean=mean, std=std)
    assert [tuple(b.shape) for b in batches] == [(50, 1, 3, 3)] * 2
    crops = torch.cat(batches)
    assert crops.dtype == torch.float32
    assert torch.all(crops == crops[:, :, :1, :1])                     # one channel, one value per crop
    assert {round(float(v), 5) for v in crops[:, 0, 0, 0]} == expected   # every channel drawn, normalised


def test_region_inputs_are_the_same_crops_as_from_normalised_images():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (7, 2, 8, 8), dtype=torch.uint8, generator=g)
    mean, std = (0.4, 0.6), (0.2, 0.3)
    normalised = (images.float() / 255 - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
    from_pixels = region_inputs(images, num_batches=2, batch_size=9, generator=torch.Generator().manual_seed(5),
                                mean=mean, std=std)
    from_floats = region_inputs(normalised, num_batches=2, batch_size=9, generator=torch.Generator().manual_seed(5))
    for a, b in zip(from_pixels, from_floats):
        torch.testing.assert_close(a, b)


def test_region_inputs_refuse_bad_arguments():
    images = torch.zeros(4, 2, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="together"):
        region_inputs(images, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="one value per channel"):
        region_inputs(images, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="batch_size"):
        region_inputs(images, batch_size=0)


def test_measurements_leave_an_eval_network_with_running_statistics_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():   # running statistics that a training-mode forward would change
        net(torch.randn(8, 1, 6, 6))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 1, 6, 6)
    train_kappa = ntk_condition_number(net, x)                    # training mode: batch statistics
    eval_kappa = ntk_condition_number(net, x, train_mode=False)   # running statistics
    linear_regions(net, [x])
    assert train_kappa.defined and eval_kappa.defined and train_kappa.kappa != eval_kappa.kappa
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m.training for m in net.modules())
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.grad is None for p in net.parameters())

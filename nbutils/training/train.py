"""Retraining: the evaluation network built from a genotype, trained from scratch on clean data.

The P-DARTS training recipe (``train_cifar.py``), run by the shared loop
(:func:`nbutils.training.loop.train_supervised`): SGD with momentum and cosine annealing to 0,
gradient clipping, auxiliary loss, drop path ramped linearly over the epochs, random crop and
flip, cutout. On CUDA, optionally mixed precision (float16 autocast with a gradient scaler);
optionally channels_last activations.
"""
from __future__ import annotations

import time
from typing import Literal

import torch

from ..core.config import (Cells, Channels, NonNegativeInt, NonNegativeNumber, PositiveInt, Rate, config, keyed,
                           keyed_when_changed)
from ..core.batches import BatchLoader
from ..core.image_dataset import ImageDataset, channel_stats
from ..space.genotype import Genotype
from ..accel.fast_network import accelerate
from ..space.network import EvalNetwork, count_parameters
from .loop import evaluate, train_supervised
from .recipe import SgdSettings, TrainingRecipe


@config
class RetrainConfig(SgdSettings):
    """The retraining's settings, what retrain.yaml sets; the defaults are P-DARTS'
    (``train_cifar.py``: 600 epochs of a 20-cell network with 36 channels)."""

    epochs: PositiveInt = keyed(600)
    channels: Channels = keyed(36)
    layers: Cells = keyed(20)
    batch_size: PositiveInt = keyed(128)
    auxiliary: bool = keyed(True)
    auxiliary_weight: NonNegativeNumber = keyed(0.4)
    drop_path: Rate = keyed(0.3)
    cutout: NonNegativeInt = keyed(16)   # side of the square cut out of each image; 0: none
    augment: bool = keyed(True)
    mixed_precision: bool = keyed(False)   # float16 autocast + gradient scaling, on CUDA only (ignored elsewhere)
    channels_last: bool = keyed(False)   # NHWC activations (faster convolutions on recent GPUs)
    fast: bool = keyed(True)   # on the CPU, the fast evaluation network (same function and parameters)
    # the cosine schedule's rate changes per "epoch" (P-DARTS) or per "step" (a short retraining's
    # last steps then train near lr_min: see nbutils.training.loop)
    lr_schedule: Literal["epoch", "step"] = keyed_when_changed("epoch")


def retraining_recipe(config: RetrainConfig) -> TrainingRecipe:
    """The loop's recipe from a retraining configuration: its SGD settings and the rest of P-DARTS' recipe."""
    return config.recipe(config.epochs, auxiliary_weight=config.auxiliary_weight, drop_path=config.drop_path,
                         cutout=config.cutout, mixed_precision=config.mixed_precision,
                         channels_last=config.channels_last, lr_schedule=config.lr_schedule)


def evaluation_network(genotype: Genotype, train_set: ImageDataset, config: RetrainConfig) -> torch.nn.Module:
    """The network retraining trains: DARTS' evaluation network of ``genotype`` at the configured
    size, with the auxiliary head when configured. This is the one place that builds it, so a
    network computing the same function faster (e.g. NHWC throughout) is chosen here."""
    return EvalNetwork(
        genotype,
        channels=config.channels,
        num_classes=train_set.num_classes,
        layers=config.layers,
        auxiliary=config.auxiliary,
        in_channels=train_set.in_channels,
        input_size=train_set.images.shape[-1],
    )


def retrain(
    genotype: Genotype,
    train_set: ImageDataset,
    test_set: ImageDataset,
    config: RetrainConfig,
    *,
    seed: int,
    device: torch.device,
) -> dict:
    """Train the genotype's network from scratch and return its test accuracy and training curve.

    ``seed`` seeds the weights' initialisation (torch's global generator), the loader's
    shuffling and augmentation, and cutout's generator."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = evaluation_network(genotype, train_set, config).to(device)
    if config.fast:
        model = accelerate(model)   # the same network where the fast forward does not apply (CUDA)
    mean, std = channel_stats(train_set)
    train_loader = BatchLoader(train_set, config.batch_size, shuffle=True, seed=seed, augment=config.augment, mean=mean, std=std, device=device)
    test_loader = BatchLoader(test_set, 256, shuffle=False, seed=seed, mean=mean, std=std, device=device)
    start = time.perf_counter()
    run = train_supervised(model, train_loader, retraining_recipe(config), cutout_generator=generator, name="retraining")
    test_acc, test_loss = evaluate(model, test_loader)
    return {
        "test_acc": test_acc,
        "test_loss": test_loss,
        "curve": run.curve,
        "parameters": count_parameters(model, exclude_auxiliary=True),
        "seconds": time.perf_counter() - start,
        "mixed_precision": run.mixed_precision,
        "channels_last": config.channels_last,
        "model": model,
    }

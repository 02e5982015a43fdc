"""How much work each NAS algorithm's search is, in the cost model's units
(:mod:`nbutils.pipeline.cost_model`): the images a search pushes through a network, times the
network's size. Each algorithm's record (:mod:`nbutils.nas.registry`) names its formula here;
an algorithm without one (TE-NAS, whose pruning rounds do not grow with a network's size)
counts one unit per search.

Every formula reads the search's config section as the stage's spec holds it (a dict), the
images of the search data (both halves) and the side of the search images.
"""
from __future__ import annotations

import math


def network_units(channels: int, cells: int, side: int) -> float:
    """The convolution cost proxy of a cell network: channels² x cells x pixels, in millions."""
    return channels * channels * cells * side * side / 1e6


#: a supernet step's cost that does not grow with the batch or the image, per cell, in the units of
#: ``batch x`` :func:`network_units`: on the CPU a small supernet's step is bound by the overhead of its
#: thousands of small operations (C=8, 5 cells, 16 px: ~0.16 s of a 0.35 s weight step at batch 32,
#: fitted on batch 16/32/64 and 8/12/16 px; benchmarks/README.md)
STEP_OVERHEAD_PER_CELL = 0.40
#: a first-order architecture step (a forward and a backward to alpha only) against a weight step,
#: measured at the quick preset's search (0.24 s against 0.33 s); a second-order one computes a
#: weight gradient, the validation gradient and two alpha gradients, about four weight steps
ARCH_STEP_SHARE = {1: 0.75, 2: 4.0}


def darts_units(config: dict, images: int, side: int) -> float:
    """A DARTS search's work (or one P-DARTS stage's): its weight steps (every epoch, a batch of
    one half each) and its architecture steps (after the warm-up epochs, one per weight step),
    each step at the overhead plus arithmetic proxy of a supernet step
    (:data:`STEP_OVERHEAD_PER_CELL`)."""
    per_epoch = math.ceil(images / 2 / config["batch_size"])
    weight_steps = config["epochs"] * per_epoch
    arch_steps = (config["epochs"] - config.get("warmup_epochs", 0)) * per_epoch
    step = STEP_OVERHEAD_PER_CELL * config["layers"] + config["batch_size"] * network_units(
        config["channels"], config["layers"], side)
    return (weight_steps + ARCH_STEP_SHARE[config.get("order", 1)] * arch_steps) * step


def pdarts_units(config: dict, images: int, side: int) -> float:
    """A DARTS search per stage, of growing depth and fewer operations per edge (8, then
    ``num_to_keep``)."""
    alive = [8, *config.get("num_to_keep", (5, 3, 1))]
    return sum(darts_units({**config, "layers": cells}, images, side) * alive[stage] / 8
               for stage, cells in enumerate(config["layers"]))


def robot_units(config: dict, images: int, side: int) -> float:
    """The training-free metrics of the pool (six, on one batch each), then the queried
    architectures' training."""
    net = network_units(config["channels"], config["layers"], side)
    return (config["pool_size"] * config["metric_batch_size"] * 6
            + config["budget"] * config["train_epochs"] * images / 2) * net


def nsganetv2_units(config: dict, images: int, side: int) -> float:
    """The supernet's training, then the candidates measured on calibration batches."""
    net = network_units(config["channels"], config["layers"], side)
    measured = config["initial_design"] + config["iterations"] * config["candidates_per_iteration"]
    return (config["epochs"] * images / 2 + measured * config["calibration_batches"] * config["batch_size"]) * net

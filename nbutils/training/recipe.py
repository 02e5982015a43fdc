"""What a training runs with: the loop's :class:`TrainingRecipe`, and :class:`SgdSettings`, the
SGD settings every config that trains weights shares, declared once.

A config composes :class:`SgdSettings` by inheriting it (its fields come first, before the
config's own; a parameter file stays flat: ``lr:`` is a key of the section like any other). A
config whose default or key decision differs declares the field again, with the same type and
its own default (RoBoT's ``lr: 0.1``). :meth:`SgdSettings.recipe` is the one way from a config to
the loop's recipe: these five settings, and what the caller adds (the epochs, drop path, ...).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from ..core.config import NonNegativeInt, NonNegativeNumber, PositiveNumber, Rate, config, keyed


@config
class TrainingRecipe:
    """How :func:`~nbutils.training.loop.train_supervised` trains (a config,
    :mod:`nbutils.core.config`): SGD with momentum and weight decay, cosine-annealed from ``lr``
    to ``lr_min`` over ``epochs`` (``lr_schedule``: the rate changes once per epoch, as DARTS and
    P-DARTS do, or at every step, see :func:`~nbutils.training.loop.train_supervised`), and the
    optional parts (``grad_clip`` None: no clipping;
    ``auxiliary_weight``: the auxiliary loss's weight when the network has a head; ``drop_path``:
    the ramp's final probability, 0 off; ``cutout``: the square's side, 0 off). Each caller
    derives its recipe from its own config (:meth:`SgdSettings.recipe`). The defaults are DARTS'
    (momentum 0.9, weight decay 3e-4, clipping at 5, auxiliary weight 0.4)."""

    epochs: NonNegativeInt
    lr: PositiveNumber
    lr_min: NonNegativeNumber = 0.0
    momentum: Rate = 0.9
    weight_decay: NonNegativeNumber = 3e-4
    grad_clip: Optional[PositiveNumber] = 5.0
    auxiliary_weight: NonNegativeNumber = 0.4
    drop_path: Rate = 0.0
    cutout: NonNegativeInt = 0
    mixed_precision: bool = False   # float16 autocast + gradient scaling, on CUDA only
    channels_last: bool = False
    divergence: Literal["raise", "warn"] = "raise"
    lr_schedule: Literal["epoch", "step"] = "epoch"


@config
class SgdSettings:
    """The weights' SGD: learning rate cosine-annealed from ``lr`` to ``lr_min``, momentum, weight
    decay and the gradient's norm clipped at ``grad_clip``. The defaults are DARTS' search recipe
    (``train_search.py``, but ``lr_min`` 0); every field is keyed (:func:`~nbutils.core.config.keyed`)."""

    lr: PositiveNumber = keyed(0.025)
    lr_min: NonNegativeNumber = keyed(0.0)
    momentum: Rate = keyed(0.9)
    weight_decay: NonNegativeNumber = keyed(3e-4)
    grad_clip: PositiveNumber = keyed(5.0)

    def recipe(self, epochs: int, **parts: Any) -> TrainingRecipe:
        """The loop's recipe: these settings over ``epochs``, with the recipe's other ``parts``
        (``drop_path``, ``cutout``, ``divergence``, ...; their defaults otherwise)."""
        return TrainingRecipe(epochs=epochs, lr=self.lr, lr_min=self.lr_min, momentum=self.momentum,
                              weight_decay=self.weight_decay, grad_clip=self.grad_clip, **parts)

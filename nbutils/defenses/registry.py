"""One record per defence: its name and display name, the settings it owns, its input checks and
the function that applies it.

Everything that lists defences derives from :data:`DEFENSES`: the names
:class:`~nbutils.defenses.defending.DefenseConfig` accepts, each defence's settings
(:data:`DEFENSE_SETTINGS`: defend.yaml's sections in :mod:`nbutils.pipeline.stage_params`) and
:func:`~nbutils.defenses.defending.defend`'s dispatch. :func:`names` selects them by what they
change (``names(changes_labels=True)``).

Adding a defence is a module with its function (and input check), one :class:`Defense` here, its
settings as fields of :class:`~nbutils.defenses.defending.DefenseConfig`, and a section of the
same name in defend.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.image_dataset import ImageDataset
from .denoising import check_denoise, denoise_defense
from .relabelling import check_relabel, relabel_defense
from .result import DefenseResult
from .sanitisation import check_sanitise, sanitise_defense

#: how :func:`~nbutils.defenses.defending.defend` applies a defence: ``apply(poisoned, config,
#: device, clean_labels, clean_images, poison_indices, trusted) -> DefenseResult``; the three
#: clean-side arguments (checked, may be None) are the audit's knowledge, only for the record
Apply = Callable[..., DefenseResult]
#: the defence's own input checks, before any compute: ``check(poisoned, config, trusted)`` raises ValueError
Check = Callable[[ImageDataset, object, "ImageDataset | None"], None]


@dataclass(frozen=True)
class Defense:
    """What the package needs to know of one defence."""

    name: str              #: as grid.yaml and defend.yaml name it
    display_name: str      #: as the report can name it
    apply: Apply           #: what :func:`~nbutils.defenses.defending.defend` calls (:data:`Apply`)
    check: Check           #: its input checks (:data:`Check`)
    #: the :class:`~nbutils.defenses.defending.DefenseConfig` fields it owns (besides ``name``
    #: and ``seed``): its defend.yaml section
    settings: tuple[str, ...]
    drops_samples: bool = False    #: the defended set is smaller (a filter)
    changes_labels: bool = False   #: the defended set has new labels
    changes_images: bool = False   #: the defended set has new images


#: every defence, in the order the TMLR paper's Table 4 and the report list them
DEFENSES: dict[str, Defense] = {d.name: d for d in (
    # loss-based sanitisation (Koh et al., 2021)
    Defense("sanitise", "Sanitisation", sanitise_defense, check_sanitise, drops_samples=True,
            settings=("fraction", "surrogate_epochs", "surrogate_batch_size", "surrogate_lr", "surrogate_augment")),
    # cluster-based relabelling (the TMLR paper's own)
    Defense("relabel", "Relabelling", relabel_defense, check_relabel, changes_labels=True,
            settings=("extractor", "extractor_weights", "extractor_image_size", "allow_fallback", "kmeans_restarts")),
    # diffusion denoising (Hong et al., 2024)
    Defense("denoise", "Denoising", denoise_defense, check_denoise, changes_images=True,
            settings=("sigma", "ddpm_path", "ddpm_trusted_size", "ddpm_epochs", "ddpm_batch_size", "ddpm_lr",
                      "ddpm_width", "ddpm_timesteps", "ddpm_train_near_sigma", "denoise_batch_size")),
)}


def names(**flags: bool) -> tuple[str, ...]:
    """The defences whose flags (``drops_samples``, ``changes_labels``, ``changes_images``) have
    the given values, in :data:`DEFENSES` order."""
    return tuple(d.name for d in DEFENSES.values() if all(getattr(d, f) == v for f, v in flags.items()))


#: the settings of each defence (the fields of :class:`~nbutils.defenses.defending.DefenseConfig`
#: besides ``name`` and ``seed``)
DEFENSE_SETTINGS: dict[str, tuple[str, ...]] = {d.name: d.settings for d in DEFENSES.values()}

"""grid.yaml's params: what runs. The datasets, the attacks and their budgets, the defences, the
out-of-distribution searches and the ablation, and the rules across them (each cell comes from one
entry, every named algorithm is searched, ...), checked before anything runs."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from ..attacks import registry as attack_registry
from ..core.config import EachOnce, MAX_REPEATS, PositiveInt, Repeats, Seed, integer, integer_within, number
from ..core.datasets import DATASETS, SPLIT_SIZES
from ..defenses import registry as defense_registry
from ..nas import registry
from .params_base import Params

DatasetName = Literal[DATASETS]  # type: ignore[valid-type]
Budget = Annotated[number(gt=0, le=1), Field(description="fraction of the search data, in (0, 1]")]
ImageSide = integer(8)
RandomSamples = integer_within(0, MAX_REPEATS, "far beyond any study; the papers sample 10 to 100")
SearchSize = integer_within(2, None, "the search splits its images into two halves: weights and architecture")

NAS_ALGORITHMS = tuple(registry.ALGORITHMS)   # darts_anti: the workshop paper's anti-search, Table 1
LABEL_FREE = registry.names(label_free=True)    # never read labels: label flipping cannot change what they find
ATTACK_NAMES = ("none", *attack_registry.ATTACKS)
#: NAS algorithms named in a list, each once
Algorithms = Annotated[list[Literal[NAS_ALGORITHMS]], EachOnce]  # type: ignore[valid-type]


# --- grid.yaml: what runs ---------------------------------------------------------------------
class DataParams(Params):
    dataset: DatasetName = "fashion_mnist"
    data_root: Optional[str] = None
    download: bool = False
    subset_seed: Seed = 0   # which images the subsets below take
    search_size: Optional[SearchSize] = None   # training images the search sees (None: all)
    search_image_size: Optional[ImageSide] = None
    train_size: Optional[PositiveInt] = None    # clean training images for retraining (None: all)
    test_size: Optional[PositiveInt] = None     # test images for the final accuracy (None: all)
    image_size: Optional[ImageSide] = None

    @field_validator("data_root")
    @classmethod
    def _absolute_data_root(cls, root: Optional[str]) -> Optional[str]:
        """A relative ``data_root`` is taken from the working directory of the run and made
        absolute here, before it reaches a notebook (whose kernel runs in ``notebooks/``)."""
        return None if root in (None, "") else str(Path(root).expanduser().resolve())

    @model_validator(mode="after")
    def _sizes_fit_the_splits(self) -> "DataParams":
        check_sizes_fit(self.dataset, {"search_size": ("train", self.search_size),
                                       "train_size": ("train", self.train_size),
                                       "test_size": ("test", self.test_size)})
        return self


def check_sizes_fit(dataset: str, sizes: dict[str, tuple[str, Optional[int]]]) -> None:
    """Refuse a subset larger than the split it is drawn from (``sizes``: key -> (split, size)),
    naming the key, the value and the split's size: before any compute, not at stage time."""
    for key, (split, size) in sizes.items():
        available = SPLIT_SIZES[dataset][split]
        if size is not None and size > available:
            raise ValueError(f"{key}: {size} is more than the {available} images of {dataset}'s {split} split "
                             f"(allowed: 1..{available}, or null for all of them)")


#: grid.yaml's ``data``: one mapping or a list of them, told apart before validation so that an
#: error names ``data.dataset`` (or ``data.1.dataset``), not both readings (the tags are dropped
#: from error paths by :func:`_format_errors`)
DATA_TAGS = ("one", "several")
DataChoice = Annotated[
    Union[Annotated[DataParams, Tag("one")],
          Annotated[Annotated[list[DataParams], Field(min_length=1), EachOnce], Tag("several")]],
    Discriminator(lambda value: "several" if isinstance(value, list) else "one"),
]


class AttackEntry(Params):
    name: Literal[ATTACK_NAMES]  # type: ignore[valid-type]
    budgets: Annotated[list[Budget], EachOnce] = []
    ensemble: Optional[PositiveInt] = None   # alpha only: supernets in the ensemble (workshop: e=1 or 6)
    algorithms: Optional[Algorithms] = None   # default: every one

    @model_validator(mode="after")
    def _budgets_match_name(self) -> "AttackEntry":
        if self.name == "none" and self.budgets:
            raise ValueError("attack 'none' takes no budgets")
        if self.name != "none" and not self.budgets:
            raise ValueError(f"attack {self.name!r} needs at least one budget in (0, 1]")
        if self.ensemble is not None and self.name != "alpha":
            raise ValueError(f"ensemble applies to the alpha attack only, not {self.name!r}")
        return self

    @property
    def condition(self) -> str:
        """The name the report groups by: the attack, with the alpha attack's ensemble size."""
        return f"alpha-e{self.ensemble or 1}" if self.name == "alpha" else self.name


class OodEntry(Params):
    """Search on another dataset, retrain on the grid's (TMLR Table 3)."""

    dataset: DatasetName    # the search data (noise: pure random images)
    search_size: Optional[SearchSize] = None
    search_image_size: Optional[ImageSide] = None
    algorithms: Optional[Algorithms] = None   # default: every one

    @model_validator(mode="after")
    def _size_fits_the_split(self) -> "OodEntry":
        check_sizes_fit(self.dataset, {"search_size": ("train", self.search_size)})
        return self


class DefenseEntry(Params):
    """One defence applied to poisoned search data before the search (TMLR Table 4)."""

    name: Literal[tuple(defense_registry.DEFENSES)]  # type: ignore[valid-type]
    attacks: Annotated[list[str], Field(min_length=1), EachOnce]   # the conditions it defends (e.g. rlf, gc)
    algorithms: Optional[Algorithms] = None   # default: every one
    budgets: Optional[Annotated[list[Budget], EachOnce]] = None   # default: every budget of those attacks (TMLR Table 4: 50% only)


class GridParams(Params):
    """grid.yaml: what runs. ``data`` is one dataset (a mapping) or several (a list of mappings,
    TMLR Table 1's CIFAR-10 and CIFAR-100): the main study (every algorithm under every attack,
    its clean reference, the random baseline) runs on each, and the report shows one table per
    dataset, each cell tested against the clean trials of its own algorithm and dataset. The
    other studies (defences, out-of-distribution search, the augmentation ablation, metric
    sensitivity) run on the first dataset, the *primary* one, as the TMLR paper runs its
    Tables 2-4 and 6 on CIFAR-10 only."""

    data: DataChoice = DataParams()
    defenses: Annotated[list[DefenseEntry], EachOnce] = []
    ood: Annotated[list[OodEntry], EachOnce] = []   # out-of-distribution searches, clean, per algorithm
    augmentation_ablation: Algorithms = []   # TMLR Table 6
    trials: Repeats = 2
    seed: Seed = 0
    nas_algorithms: Annotated[Algorithms, Field(min_length=1)] = ["darts"]
    attacks: Annotated[list[AttackEntry], Field(min_length=1), EachOnce] = [AttackEntry(name="none")]
    random_samples: RandomSamples = 10

    @field_validator("data")
    @classmethod
    def _distinct_datasets(cls, data: DataParams | list[DataParams]) -> DataParams | list[DataParams]:
        names = [d.dataset for d in data] if isinstance(data, list) else [data.dataset]
        if len(set(names)) != len(names):
            raise ValueError(f"each dataset may appear once in data (its tables are named by it), got {names}")
        return data

    @property
    def datasets(self) -> list[DataParams]:
        """Every dataset of the main study, the primary one first."""
        return list(self.data) if isinstance(self.data, list) else [self.data]

    @property
    def primary(self) -> DataParams:
        """The dataset the defences, out-of-distribution searches, augmentation ablation and
        metric sensitivity run on: the first of ``data``."""
        return self.datasets[0]

    @field_validator("attacks")
    @classmethod
    def _clean_condition_present(cls, attacks: list[AttackEntry]) -> list[AttackEntry]:
        if not any(a.name == "none" for a in attacks):
            raise ValueError("the attacks must include {name: none}: the clean condition every test compares against")
        if sum(a.name == "none" for a in attacks) > 1:
            raise ValueError("{name: none} may appear once: it is the one clean condition")
        return attacks

    @model_validator(mode="after")
    def _each_cell_once(self) -> "GridParams":
        """An attack may have several entries (per-algorithm budgets: the workshop runs RLF on
        DARTS at 5%, TMLR on P-DARTS at 1, 10 and 50%), but each (attack, budget, algorithm) cell
        comes from one entry."""
        owner: dict[tuple[str, float, str], int] = {}
        for i, entry in enumerate(self.attacks):
            for budget in entry.budgets:
                for algorithm in self.attacked(entry):
                    cell = (entry.condition, budget, algorithm)
                    if cell in owner:
                        raise ValueError(f"attack {entry.condition!r} at budget {budget:g} on {algorithm} is in entries "
                                         f"{owner[cell]} and {i}: give each budget of an algorithm once")
                    owner[cell] = i
        return self

    @model_validator(mode="after")
    def _each_ood_search_once(self) -> "GridParams":
        """Each (search dataset, algorithm) comes from one ``ood`` entry: the report has one cell
        per pair, and two entries would count its trials twice."""
        owner: dict[tuple[str, str], int] = {}
        for i, entry in enumerate(self.ood):
            for algorithm in entry.algorithms or self.nas_algorithms:
                if (entry.dataset, algorithm) in owner:
                    raise ValueError(f"ood: the search of {algorithm} on {entry.dataset} is in entries "
                                     f"{owner[entry.dataset, algorithm]} and {i}; give it once")
                owner[entry.dataset, algorithm] = i
        return self

    @model_validator(mode="after")
    def _each_defended_cell_once(self) -> "GridParams":
        """Each (defence, attack, budget, algorithm) comes from one ``defenses`` entry."""
        owner: dict[tuple, int] = {}
        for i, entry in enumerate(self.defenses):
            for attack in self.attacks:
                if attack.condition not in entry.attacks:
                    continue
                for budget in [b for b in attack.budgets if entry.budgets is None or b in entry.budgets]:
                    for algorithm in self.attacked(attack):
                        if entry.algorithms is not None and algorithm not in entry.algorithms:
                            continue
                        cell = (entry.name, attack.condition, budget, algorithm)
                        if cell in owner:
                            raise ValueError(f"defense {entry.name!r} of attack {attack.condition!r} at budget {budget:g} "
                                             f"on {algorithm} is in entries {owner[cell]} and {i}; give it once")
                        owner[cell] = i
        return self

    @model_validator(mode="after")
    def _attacked_algorithms_searched(self) -> "GridParams":
        for a in self.attacks:
            extra = sorted(set(a.algorithms or ()) - set(self.nas_algorithms))
            if extra:
                raise ValueError(f"attack {a.condition!r} names algorithms {extra} that nas_algorithms does not search")
        return self

    @model_validator(mode="after")
    def _ablation_searched(self) -> "GridParams":
        extra = sorted(set(self.augmentation_ablation) - set(self.nas_algorithms))
        if extra:
            raise ValueError(f"augmentation_ablation names algorithms {extra} that nas_algorithms does not search")
        if self.augmentation_ablation and not any(a.name == "gc" for a in self.attacks):
            raise ValueError("augmentation_ablation repeats gradient canceling without search augmentation: "
                             "the attacks must include gc")
        return self

    @model_validator(mode="after")
    def _defended_attacks_exist(self) -> "GridParams":
        conditions = {a.condition for a in self.attacks if a.name != "none"}
        for d in self.defenses:
            unknown = sorted(set(d.attacks) - conditions)
            if unknown:
                raise ValueError(f"defense {d.name!r} names attacks {unknown} the grid does not run; "
                                 f"allowed: {sorted(conditions)}")
            extra = sorted(set(d.algorithms or ()) - set(self.nas_algorithms))
            if extra:
                raise ValueError(f"defense {d.name!r} names algorithms {extra} that nas_algorithms does not search")
            budgets = {b for a in self.attacks if a.condition in d.attacks for b in a.budgets}
            missing = sorted(set(d.budgets or ()) - budgets)
            if missing:
                raise ValueError(f"defense {d.name!r} names budgets {missing} that none of its attacks "
                                 f"{d.attacks} runs; allowed: {sorted(budgets)}")
        return self

    @model_validator(mode="after")
    def _label_attacks_need_labels(self) -> "GridParams":
        for a in self.attacks:
            named = sorted(set(a.algorithms or ()) & set(LABEL_FREE))
            if a.name in attack_registry.LABEL_ATTACKS and named:
                raise ValueError(f"attack {a.name!r} only changes labels, which {named} never read (TMLR Table 1 "
                                 "marks these cells '-'); remove them from its algorithms")
        return self

    def attacked(self, attack: AttackEntry) -> list[str]:
        """The algorithms an attack runs against, in nas_algorithms order; label flipping
        skips the label-free algorithms (the report marks those cells '-' with the reason)."""
        return [a for a in self.nas_algorithms if (attack.algorithms is None or a in attack.algorithms)
                and not (attack.name in attack_registry.LABEL_ATTACKS and a in LABEL_FREE)]

    @model_validator(mode="after")
    def _attack_targets_exist(self) -> "GridParams":
        for a in self.attacks:
            on = a.name != "none" and attack_registry.ATTACKS[a.name].crafted_on
            if on and on not in self.nas_algorithms:
                raise ValueError(f"the {a.name} attack crafts its poisons on clean {registry.ALGORITHMS[on].display_name} "
                                 f"supernets: nas_algorithms must include {on}")
        return self

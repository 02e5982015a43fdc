"""Search trajectories (outputs/epochs.csv and the report's figure) on synthetic search artifacts
whose histories have known cells."""
import json

import numpy as np
import pandas as pd
import pytest

from nbutils.report.results import RESULT_FILE
from nbutils.report.table_cells import findings, results_table
from nbutils.report import trajectories
from nbutils.space.genotype import Genotype

CONV, POOL, SKIP = "sep_conv_3x3", "max_pool_3x3", "skip_connect"


def cell(convs: int, pools: int) -> list:
    ops = [CONV] * convs + [POOL] * pools + [SKIP] * (8 - convs - pools)
    return [(op, i % 2) for i, op in enumerate(ops)]


def genotype(convs: int, pools: int) -> dict:
    return Genotype(normal=cell(convs, pools), normal_concat=[2, 3, 4, 5],
                    reduce=cell(2, 6), reduce_concat=[2, 3, 4, 5]).to_dict()


def search_artifact(folder, normal_path: list[tuple[int, int]], warmup: int, steps: int = 10):
    """A search folder whose history's normal cells follow ``normal_path`` ((conv, pool) per epoch)."""
    folder.mkdir(parents=True)
    history = [{"epoch": e + 1, "train_acc": 0.1 * (e + 1), "val_acc": None if e < warmup else 0.5,
                "weight_steps": steps, "arch_steps": 0 if e < warmup else steps, "genotype": genotype(*counts)}
               for e, counts in enumerate(normal_path)]
    (folder / RESULT_FILE).write_text(json.dumps({"history": history}))
    return str(folder)


@pytest.fixture
def results(tmp_path):
    clean = [[(2, 6), (5, 2), (8, 0), (8, 0)], [(3, 5), (6, 2), (7, 0), (7, 1)]]
    anti = [[(6, 2), (3, 4), (0, 7), (0, 7)], [(5, 3), (2, 5), (1, 6), (0, 8)]]
    rows = []
    for algorithm, paths in (("darts", clean), ("darts_anti", anti)):
        for trial, path in enumerate(paths):
            rows.append({"algorithm": algorithm, "attack": "none", "budget": None, "trial": trial, "study": "main",
                         "search_dataset": None, "dataset": "fashion_mnist",
                         "search": search_artifact(tmp_path / f"{algorithm}{trial}", path, warmup=1)})
    rows.append({"algorithm": "random", "attack": "none", "budget": None, "trial": 0, "study": "main",
                 "search_dataset": None, "dataset": "fashion_mnist", "search": str(tmp_path / "random")})
    return pd.DataFrame(rows)


def test_epochs_csv_one_row_per_trial_and_epoch(results):
    epochs = trajectories.epochs_csv(results)
    assert list(epochs.columns) == trajectories.EPOCHS_CSV_COLUMNS
    assert len(epochs) == 4 * 4 and "random" not in set(epochs.algorithm)
    row = epochs[(epochs.algorithm == "darts") & (epochs.trial == 1) & (epochs.epoch == 2)].iloc[0]
    assert (row.normal_conv, row.normal_pool, row.normal_skip) == (6, 2, 0)
    assert (row.reduce_conv, row.reduce_pool, row.reduce_skip) == (2, 6, 0)
    # steps are cumulative; the warm-up epoch has no validation accuracy and no architecture step
    first = epochs[(epochs.algorithm == "darts") & (epochs.trial == 0)]
    assert first.weight_steps.tolist() == [10, 20, 30, 40] and first.arch_steps.tolist() == [0, 10, 20, 30]
    assert pd.isna(first.val_acc.iloc[0]) and first.val_acc.iloc[1] == 0.5


def test_epochs_csv_leaves_steps_empty_for_histories_without_them(tmp_path, results):
    path = results.search.iloc[0] + "/" + RESULT_FILE
    record = json.loads(open(path).read())
    for row in record["history"]:
        del row["weight_steps"], row["arch_steps"]
    open(path, "w").write(json.dumps(record))
    epochs = trajectories.epochs_csv(results)
    old = epochs[(epochs.algorithm == "darts") & (epochs.trial == 0)]
    assert old.weight_steps.isna().all() and epochs.weight_steps.notna().sum() == 12


def test_last_epoch_cells_and_settling(results):
    cells = trajectories.last_epoch_cells(trajectories.epochs_csv(results)).set_index("algorithm")
    assert cells.loc["darts", "conv"] == pytest.approx(7.5) and cells.loc["darts_anti", "pool"] == pytest.approx(7.5)
    assert cells.loc["darts", "weight_steps"] == 40 and cells.loc["darts", "arch_steps"] == 30
    assert cells.loc["darts", "first_arch_epoch"] == 2
    # mean conv counts per epoch: darts 2.5, 5.5, 7.5, 7.5 (within one of 7.5 from epoch 3)
    assert cells.loc["darts", "conv_settled"] == 3
    # anti-search: 5.5, 2.5, 0.5, 0 -> within one of 0 from epoch 3
    assert cells.loc["darts_anti", "conv_settled"] == 3
    # the warm-up's cell is alpha's initial one: it does not count as settled, however close
    epochs = trajectories.epochs_csv(results)
    flat = epochs.assign(normal_conv=np.where(epochs.epoch == 1, 7, np.where(epochs.trial == 0, 8, 7)))
    assert trajectories.settled_epoch(flat[flat.algorithm == "darts"]) == 2   # means 7 (warm-up), 7.5, 7.5, 7.5
    sentences = trajectories.regime_sentences(trajectories.epochs_csv(results))
    assert len(sentences) == 2 and "40 weight steps, 30 of them with an architecture step (from epoch 2)" in sentences[0] and "7.5 convolutions" in sentences[0]


def test_trajectory_figure_one_panel_per_condition(results):
    figure = trajectories.trajectory_figure(trajectories.epochs_csv(results))
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert len(panels) == 2
    # per panel: three kinds, each with two faint trial lines and one mean line
    assert all(len(ax.lines) == 3 * (2 + 1) for ax in panels)
    mean_conv = [line for line in panels[0].lines if line.get_linewidth() > 2][0]
    assert np.allclose(mean_conv.get_ydata(), [2.5, 5.5, 7.5, 7.5])
    assert trajectories.trajectory_figure(trajectories.epochs_csv(results.iloc[-1:])) is None


def test_findings_say_whether_the_clean_search_beats_random_sampling():
    rows = [{"algorithm": a, "attack": "none", "budget": None, "trial": i, "acc": acc, "dataset": "d",
             "search_seconds": 1.0, "retrain_seconds": 1.0, "anchor": ""}
            for a, accs in (("darts", [88.0, 88.5, 89.0, 88.2]), ("random", [85.0, 85.5, 84.8, 85.2]))
            for i, acc in enumerate(accs)]
    table = results_table(pd.DataFrame(rows))
    sentence = findings(table)[0]
    assert sentence.startswith("**Beats random sampling**") and "dImp +3.30 pp" in sentence
    rows = [r | {"acc": r["acc"] - 3.3} if r["algorithm"] == "darts" else r for r in rows]
    assert findings(results_table(pd.DataFrame(rows)))[0].startswith(
        "**Not distinguishable from random sampling**")


@pytest.mark.parametrize("train_acc, memorised", [(0.38, False), (0.7, True)])
def test_memorisation_is_judged_against_the_clean_share(tmp_path, train_acc, memorised):
    folder = tmp_path / "rlf"
    search_artifact(folder, [(8, 0), (6, 0)], warmup=1)
    record = json.loads((folder / RESULT_FILE).read_text())
    record["history"][-1]["train_acc"] = train_acc
    (folder / RESULT_FILE).write_text(json.dumps(record))
    results = pd.DataFrame([{"algorithm": "darts", "attack": "rlf", "budget": 0.5, "trial": 0, "study": "main",
                             "search_dataset": None, "dataset": "d", "search": str(folder)}])
    sentence, = trajectories.memorisation_sentences(trajectories.epochs_csv(results))
    assert f"was {train_acc:.2f}" in sentence and "2.0 skip connections" in sentence
    assert ("had begun to memorise" in sentence) == memorised

"""The report's tables, figures and CSV files, on synthetic trials with known answers."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from nbutils.core.image_dataset import ImageDataset
from nbutils.core.poison_set import PoisonSet
from nbutils.report.charts import budget_figure, figure_image, trials_figure
from nbutils.report.poison_figures import poison_figure
from nbutils.report.results import TRIALS_CSV_COLUMNS, load_sensitivity, trials_anchor, trials_csv
from nbutils.report.stats import CellSummary, benjamini_hochberg, welch_less
from nbutils.report.table_cells import CELLS_CSV_COLUMNS, cells_csv, findings, results_table
from nbutils.report.tables import ood_html, reference_points_html, sensitivity_html, table_html
from nbutils.space.genotype import Genotype, random_genotype

CLEAN = [50.0, 52.0, 51.0]
RLF = [40.0, 41.0, 43.0]
OOD_DIGITS = [30.0, 33.0, 31.0]
OOD_NOISE = [49.0, 53.0, 51.5]
RANDOM = [45.0, 47.0, 46.0]


def trials(algorithm, attack, budget, accs, study="main", search_dataset=None):
    rng = np.random.default_rng(len(accs))
    return [{"algorithm": algorithm, "attack": attack, "budget": budget, "trial": i, "acc": acc, "study": study,
             "search_dataset": search_dataset, "genotype": random_genotype(rng), "parameters": 1000 + i,
             "search_seconds": 60.0, "retrain_seconds": 120.0, "artifact": f"/out/retrain/r{algorithm}{attack}{i}",
             "search": f"/out/search/s{algorithm}{attack}{i}", "seed": i,
             "anchor": trials_anchor(algorithm, attack, budget, study, search_dataset)}
            for i, acc in enumerate(accs)]


@pytest.fixture
def results():
    rows = (trials("darts", "none", None, CLEAN) + trials("darts", "rlf", 0.5, RLF)
            + trials("darts", "none", None, OOD_DIGITS, "ood", "digits")
            + trials("darts", "none", None, OOD_NOISE, "ood", "noise")
            + trials("random", "none", None, RANDOM))
    return pd.DataFrame(rows)


def test_workshop_table_1_draws_only_the_main_study(results):
    page = reference_points_html(results, CellSummary.of(results[results.algorithm == "random"].acc))
    darts = page[page.index("DARTS (clean)"):page.index("Random sampling")]
    assert "<td>3</td>" in darts and f"{np.mean(CLEAN):.2f} ± {np.std(CLEAN, ddof=1):.2f}" in darts


def test_cells_csv_holds_every_study_with_its_own_reference(results):
    cells = cells_csv(results, "fashion_mnist")
    assert list(cells.columns) == CELLS_CSV_COLUMNS
    assert set(cells.study) == {"main", "ood:digits", "ood:noise"}
    main = cells[cells.study == "main"].set_index("attack")
    assert main.loc["none", "n"] == 3 and math.isnan(main.loc["none", "p"])
    assert main.loc["rlf", "p"] == pytest.approx(welch_less(RLF, CLEAN))
    assert main.loc["rlf", "dimp"] == pytest.approx(np.mean(RLF) - np.mean(RANDOM))
    assert main.loc["rlf", "cpu_hours"] == pytest.approx(3 * 180 / 3600)
    # each OOD search tested against the in-distribution clean trials, BH over the algorithm's OOD cells
    ood = cells[cells.study.str.startswith("ood:")].set_index("study")
    expected = [welch_less(OOD_DIGITS, CLEAN), welch_less(OOD_NOISE, CLEAN)]
    assert list(ood.p) == pytest.approx(expected)
    reject, adjusted = benjamini_hochberg(expected, 0.05)
    assert list(ood.p_bh) == pytest.approx(list(adjusted)) and list(ood.significant) == list(reject)
    assert ood.loc["ood:digits", "significant"] and not ood.loc["ood:noise", "significant"]
    # the main table of the report is the main study of the CSV
    table = results_table(results[results.study == "main"])
    assert table.acc_mean.tolist() == pytest.approx(main.acc_mean.tolist())


def test_trials_csv_one_row_per_trial(results):
    rows = trials_csv(results, "fashion_mnist")
    assert list(rows.columns) == TRIALS_CSV_COLUMNS and len(rows) == len(results)
    assert set(rows.study) == {"main", "ood:digits", "ood:noise"}
    assert rows[rows.algorithm == "random"].search_dataset.isna().all()
    assert set(rows[rows.study == "main"].dropna(subset=["search_dataset"]).search_dataset) == {"fashion_mnist"}
    assert rows.retrain_artifact.iloc[0] == "retrain/rdartsnone0"
    assert Genotype.from_json(rows.genotype.iloc[0]) == results.genotype.iloc[0]


def test_defended_cells_test_the_improvement(results):
    defended = pd.DataFrame(trials("darts", "rlf", 0.5, [48.0, 49.0, 50.5], "defense:sanitise"))
    cells = cells_csv(pd.concat([results, defended], ignore_index=True), "fashion_mnist")
    row = cells[cells.study == "defense:sanitise"].iloc[0]
    assert row.p == pytest.approx(welch_less(RLF, [48.0, 49.0, 50.5])) and row.significant


def test_every_trial_figure_labels_do_not_overlap(results):
    more = [trials("darts", attack, 0.5, RLF) for attack in ("gc", "alpha-e1", "gaussian", "clf")]
    frame = pd.concat([results, *map(pd.DataFrame, more)], ignore_index=True)
    figure = trials_figure(frame)
    figure.canvas.draw()
    boxes = [label.get_window_extent() for label in figure.axes[0].get_yticklabels()]
    assert len(boxes) == 9   # 4 conditions of the fixture, 4 more attacks, random sampling
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert {label.get_text() for label in figure.axes[0].get_yticklabels()} >= {
        "None", "RLF 50%", "None, searched on digits", "random sampling", "α-gradient (e=1) 50%"}


def test_figures_are_displayed_as_images(results):
    table = results_table(results[results.study == "main"])
    image = figure_image(budget_figure(table, "darts"))
    assert image.format == "png" and image.data.startswith(b"\x89PNG")
    assert image._repr_png_() is not None


def test_anti_search_is_tested_below_clean_darts(results):
    anti = [47.0, 48.5, 49.0]
    frame = pd.concat([results, pd.DataFrame(trials("darts_anti", "none", None, anti))], ignore_index=True)
    table = results_table(frame[frame.study == "main"]).set_index(["algorithm", "attack"])
    row = table.loc[("darts_anti", "none")]
    assert row.p == pytest.approx(welch_less(anti, CLEAN)) and row.p_bh == pytest.approx(row.p) and row.significant
    # DARTS' own family is unchanged by it: the RLF cell alone
    assert table.loc[("darts", "rlf"), "p_bh"] == pytest.approx(welch_less(RLF, CLEAN))


def test_findings_say_what_was_found_and_what_was_not(results):
    rows = [results, pd.DataFrame(trials("darts_anti", "none", None, [51.0, 53.0, 52.0])),
            pd.DataFrame(trials("darts", "gaussian", 0.5, [49.0, 51.5, 50.0]))]
    frame = pd.concat(rows, ignore_index=True)
    table = results_table(frame[frame.study == "main"])
    found = findings(table)
    # clean DARTS against random sampling, then the tested cells: RLF, noise, anti-search
    assert len(found) == 4 and found[0].startswith("**Beats random sampling**: DARTS on clean data")
    rlf, = [s for s in found if "RLF 50%" in s]
    assert rlf.startswith("**Found**") and f"{np.mean(RLF):.2f}% against {np.mean(CLEAN):.2f}%" in rlf
    noise, = [s for s in found if "Noise 50%" in s]
    drop = table[table.attack == "gaussian"].detectable_drop.iloc[0]
    assert noise.startswith("**Not found**:") and f"a drop of {drop:.2f} pp" in noise
    anti, = [s for s in found if "anti-search" in s]
    assert anti.startswith("**Not found, the opposite direction**") and "workshop Table 1" in anti


def _cells(row_html: str) -> list[tuple[str, str]]:
    """(title, text) of each data cell of one table row."""
    import re

    return re.findall(r'<td(?: title="([^"]*)")?>(.*?)</td>', row_html)


def test_ood_table_marks_the_significant_searches_as_table_1_does(results):
    """TMLR Table 3's test is cells_csv's ood:<dataset> rows: P-DARTS-like digits cell below the
    in-distribution trials, significant after BH over the algorithm's OOD cells; noise not."""
    robot = [pd.DataFrame(trials("robot", "none", None, [60.0, 61.0, 62.0])),
             pd.DataFrame(trials("robot", "none", None, [59.5, 61.5, 60.0], "ood", "digits"))]
    frame = pd.concat([results, *robot], ignore_index=True)
    page = ood_html(frame, CellSummary.of(frame[frame.algorithm == "random"].acc), "fashion_mnist")
    rows = {r.split("</td>")[0].removeprefix("<td>"): _cells(r) for r in page.split("<tr>")[3:]}
    tests = cells_csv(frame, "fashion_mnist").set_index(["algorithm", "study"])
    darts_clean, darts_digits, darts_noise = rows["DARTS"][1:3], rows["DARTS"][3:5], rows["DARTS"][5:7]
    assert all("<b><u>" in text for _, text in darts_digits)
    assert not any("<b><u>" in text for _, text in darts_clean + darts_noise)
    for (algorithm, source), (title, _) in (((("darts", "digits"), darts_digits[0])),
                                            (("darts", "noise"), darts_noise[0]),
                                            (("robot", "digits"), rows["RoBoT"][3])):
        test = tests.loc[(algorithm, f"ood:{source}")]
        assert f"one-sided Welch p={test.p:.3g}" in title and f"BH-adjusted p={test.p_bh:.3g}" in title
    assert tests.loc[("darts", "ood:digits"), "p"] == pytest.approx(welch_less(OOD_DIGITS, CLEAN))
    # RoBoT's family is its own: its single OOD cell is not significant and is not bold
    assert not tests.loc[("robot", "ood:digits"), "significant"]
    assert not any("<b><u>" in text for _, text in rows["RoBoT"])
    assert darts_clean[0][0] == "n=3, the in-distribution reference"


def _study(tmp_path, name, summary):
    folder = tmp_path / "sensitivity" / name
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"summary": summary}))
    return str(folder)


def test_sensitivity_table_groups_tenas_then_robot_and_reads_each_gc_column_from_its_own_poisons(tmp_path):
    def line(metric, mean, std=1.0, n=4, skipped=0):
        return {"metric": metric, "mean": mean, "std": std, "n": n, "skipped": skipped}

    tenas = [line("ntk_condition_number", 0.0, 0.0), line("linear_regions", 0.0, 0.0)]
    inputs = {"sensitivity0": _study(tmp_path, "a", tenas),
              "sensitivity1": _study(tmp_path, "b", [line("grad_norm", -5.62, 2.1), line("snip", -5.85)]),
              "sensitivity2": _study(tmp_path, "c", [line("grad_norm", -0.47, 0.67, skipped=1), line("snip", -0.36)])}
    spec = {"sensitivity": [
        {"attack": "rlf", "budget": 0.5, "metrics_of": "tenas", "role": "sensitivity0"},
        {"attack": "rlf", "budget": 0.5, "metrics_of": "robot", "role": "sensitivity1"},
        {"attack": "gc", "budget": 0.5, "target": "robot", "metrics_of": "robot", "role": "sensitivity2"}],
        "sensitivity_not_run": [{"attack": "gc", "budget": 0.5, "metrics_of": "tenas",
                                 "reason": "not run: the grid crafts no gradient-canceling poisons against TE-NAS"}]}
    table = load_sensitivity(spec, inputs)
    page = sensitivity_html(table)
    head = page[page.index("<thead>"):page.index("</thead>")]
    assert head.index("TE-NAS") < head.index("RoBoT") and '<th colspan="2">TE-NAS</th>' in head
    assert head.index("κ<sub>NTK</sub>") < head.index("<i>R</i>") < head.index("grad_norm")
    rlf, gc = (_cells(r) for r in page.split("<tbody>")[1].split("<tr>")[1:])
    assert rlf[0][1] == "RLF 50%" and ">0.00 ± 0.00<" in rlf[1][1] and ">-5.62 ± 2.10<" in rlf[3][1]
    assert gc[0][1] == "GC 50%"
    assert [text for _, text in gc[1:3]] == ["not run", "not run"] and "against TE-NAS" in gc[1][0]
    assert ">-0.47 ± 0.67<" in gc[3][1] and gc[3][0] == "4 architectures, 1 undefined; poisons crafted against RoBoT"


def test_each_dataset_is_its_own_family_and_baseline(results):
    """Two datasets in one run (TMLR Table 1's CIFAR-10 and CIFAR-100): each cell is tested
    against its own dataset's clean trials and scored against its own random samples. Here the
    second dataset's flips leave the accuracy above its (lower) clean trials: pooled with the
    first, both would look significant."""
    first = results[results.study == "main"].assign(dataset="cifar10")
    second = pd.DataFrame(trials("darts", "none", None, [30.0, 31.0, 29.0]) + trials("darts", "rlf", 0.5, RLF)
                          + trials("random", "none", None, [20.0, 22.0, 21.0])).assign(dataset="cifar100")
    both = pd.concat([first, second], ignore_index=True)
    both["anchor"] = [trials_anchor(r.algorithm, r.attack, r.budget, dataset=r.dataset) for r in both.itertuples()]
    cells = cells_csv(both).set_index(["dataset", "attack"])
    assert cells.loc[("cifar10", "rlf"), "p"] == pytest.approx(welch_less(RLF, CLEAN))
    assert cells.loc[("cifar100", "rlf"), "p"] == pytest.approx(welch_less(RLF, [30.0, 31.0, 29.0]))
    assert cells.loc[("cifar10", "rlf"), "significant"] and not cells.loc[("cifar100", "rlf"), "significant"]
    assert cells.loc[("cifar100", "rlf"), "dimp"] == pytest.approx(np.mean(RLF) - 21.0)
    rows = trials_csv(both)
    assert rows.groupby("dataset").size().to_dict() == {"cifar10": len(first), "cifar100": len(second)}
    # each dataset's table links to its own trials
    page = table_html(results_table(both[both.dataset == "cifar100"]), CellSummary.of([21.0]))
    assert (trials_anchor("darts", "rlf", 0.5, dataset="cifar100")
            != trials_anchor("darts", "rlf", 0.5, dataset="cifar10"))
    assert f'href="#{trials_anchor("darts", "rlf", 0.5, dataset="cifar100")}"' in page
    assert "cifar10-" not in page.replace("cifar100", "")


def test_a_table_links_to_its_own_studys_trials(results):
    """Table 6 (search without augmentation) links to its trials, not the main study's."""
    ablation = pd.DataFrame(trials("darts", "none", None, CLEAN, "no_augment") + trials("darts", "gc", 0.5, RLF, "no_augment"))
    table = results_table(pd.concat([results[results.algorithm == "random"], ablation]))
    page = table_html(table, CellSummary.of(RANDOM))
    assert f'href="#{trials_anchor("darts", "gc", 0.5, "no_augment")}"' in page
    assert f'href="#{trials_anchor("darts", "gc", 0.5)}"' not in page


def _poison_set(folder, pool, indices, budget, eps=None, images=True):
    """A poison set on disk of ``pool``'s images ``indices`` (each shifted by one grey level)."""
    indices = torch.tensor(sorted(indices), dtype=torch.int64)
    PoisonSet(indices=indices, labels=pool.labels[indices].clone(),
              images=(pool.images[indices] + 1) if images else None,
              header={"budget": budget, "eps": eps, "source_checksum": pool.checksum()}).save(folder)
    return str(folder)


def test_poison_figure_shows_the_clean_label_poisons_at_the_largest_budget(tmp_path):
    """TMLR Figure 2: one row per clean-label attack at the largest budget (named as the tables
    name it, gradient canceling with its target), label flips and smaller budgets left out; the
    clean images come from ``load_pool``, called once with the primary dataset."""
    generator = torch.Generator().manual_seed(0)
    pool = ImageDataset("toy", torch.randint(0, 250, (8, 1, 4, 4), dtype=torch.uint8, generator=generator),
                        torch.arange(8) % 2, ("even", "odd"))
    inputs = {"noise": _poison_set(tmp_path / "noise", pool, [1, 2, 3, 5], 0.5, eps=8.0),
              "gc": _poison_set(tmp_path / "gc", pool, [2, 3, 5, 7], 0.5, eps=4.0),
              "small": _poison_set(tmp_path / "small", pool, [2, 3], 0.25, eps=8.0),
              "rlf": _poison_set(tmp_path / "rlf", pool, [0, 1, 2, 3], 0.5, images=False)}
    data = {"dataset": "toy"}
    spec = {"settings": {"grid": {"data": data}},
            "poisons": [{"attack": "gaussian", "budget": 0.5, "role": "noise"},
                        {"attack": "gc", "budget": 0.5, "role": "gc", "target": "darts"},
                        {"attack": "gaussian", "budget": 0.25, "role": "small"},
                        {"attack": "rlf", "budget": 0.5, "role": "rlf"}]}
    asked = []
    figure = poison_figure(spec, inputs, lambda d: asked.append(d) or pool, count=2)
    assert asked == [data]
    rows = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
    assert rows == ["Clean", "Noise", "GC vs DARTS", "Noise perturbation", "GC vs DARTS perturbation"]
    assert len(figure.axes) == 5 * 2   # two of the three images both attacks poisoned
    assert {ax.get_title() for ax in figure.axes if ax.get_title()} <= {"even", "odd"}

    label_flips_only = {**spec, "poisons": [p for p in spec["poisons"] if p["attack"] == "rlf"]}
    assert poison_figure(label_flips_only, inputs, lambda d: asked.append(d) or pool) is None
    assert asked == [data]   # no clean-label poisons: the clean images are not even loaded

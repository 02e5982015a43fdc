"""Where a run departs from the papers' method: plain sentences for the report, from the run's
own settings (``spec["settings"]``, every parameter file's validated values).

Two kinds. Settings a preset chose that differ from what the audit authors ran (each names the
setting that restores the reference: first-order DARTS, distinct random inputs, BN-free
synflow, ...), and departures this implementation keeps whatever the settings, listed for the
algorithms and defences the run uses (each module's docstring gives the reasons at length).
Scale (epochs, image and network sizes) is not listed: the report's opening paragraph states it.
"""
from __future__ import annotations

#: kept departures of each NAS algorithm, shown when the run searches with it
KEPT: dict[str, tuple[str, ...]] = {
    "nsganetv2": (
        "NSGANetV2 searches the DARTS space with a supernet trained on the search data; the reference "
        "starts from a once-for-all MobileNetV3 supernet pretrained on ImageNet, which cannot be had offline "
        "(nbutils/nas/nsganetv2.py).",
        "NSGANetV2's accuracy predictor sees each encoding variable divided by its upper bound; the "
        "reference fits the raw integers (a cubic RBF either way).",
    ),
}


def departures(settings: dict) -> list[str]:
    """Every departure of the run whose settings are ``settings`` (the report spec's), chosen
    ones first."""
    return chosen_departures(settings) + kept_departures(settings)


def chosen_departures(settings: dict) -> list[str]:
    """The settings of the run that differ from what the audit's authors ran, each with the
    setting that restores theirs."""
    grid, search = settings["grid"], settings["search"]
    algorithms = set(grid["nas_algorithms"])
    attacks = {a["name"] for a in grid["attacks"]}
    chosen = []
    if "darts" in algorithms and search.get("darts", {}).get("order", 1) == 1:
        chosen.append("DARTS runs with the first-order architecture gradient; the workshop's DARTS numbers "
                      "match second order (search.yaml: darts: {order: 2}).")
    if grid.get("random_samples") and search.get("random_sampler", "distinct") == "distinct":
        chosen.append("The random baseline draws two different inputs for each node; the audit authors' "
                      "sampler draws them independently, so a node may read one state twice "
                      "(search.yaml: random_sampler: independent).")
    robot_metrics = search.get("robot", {}).get("metrics")
    if "robot" in algorithms and (robot_metrics is None or "synflow" in robot_metrics):
        chosen.append("RoBoT's synflow is computed without batch norm, as the metric is defined; RoBoT's DARTS "
                      "script keeps the batch norms (search.yaml: robot: metrics with synflow_bn).")
    nsganetv2 = search.get("nsganetv2", {})
    if "nsganetv2" in algorithms:
        fork = {"predictor": "rbf", "cost": "macs", "candidate_selection": "spread", "finetune_epochs": 5}
        differ = {k: v for k, v in fork.items() if nsganetv2.get(k) != v}
        if differ:
            chosen.append("NSGANetV2 runs with settings other than the authors' fork's; theirs: "
                          + ", ".join(f"{k}: {v}" for k, v in differ.items()) + " (search.yaml's nsganetv2).")
    if "gc" in attacks:
        gc = settings["craft_poisons"].get("gc", {})
        alphas = gc.get("gradpc_epsilon_alphas") or gc.get("gradpc_epsilon")
        if gc.get("gradpc_epsilon") != 0.5 or alphas != 1.0:
            chosen.append(f"Gradient canceling's GradPC radius is {gc.get('gradpc_epsilon')} for weights targets "
                          f"and {alphas} for supernets' alphas; the audit's poison files name 0.5 for weights "
                          "targets and 1.0 for P-DARTS' alphas "
                          "(craft_poisons.yaml: gc: {gradpc_epsilon: 0.5, gradpc_epsilon_alphas: 1.0}).")
    if settings.get("retrain", {}).get("lr_schedule", "epoch") == "step":
        chosen.append("Retraining anneals its cosine learning rate at every step; P-DARTS' recipe lowers it once "
                      "per epoch, which over a few epochs leaves the last one at a sizeable rate and the accuracy "
                      "to its last batches (retrain.yaml: lr_schedule: epoch).")
    defenses = {d["name"] for d in grid.get("defenses", [])}
    defend = settings.get("defend", {})
    if "denoise" in defenses and not defend.get("denoise", {}).get("ddpm_path"):
        chosen.append("Diffusion denoising uses a small DDPM trained here on clean training images held out of "
                      "the search data; the paper's denoiser is a pretrained DDPM (defend.yaml: denoise.ddpm_path).")
    relabel = defend.get("relabel", {})
    if "relabel" in defenses and (relabel.get("allow_fallback") or relabel.get("extractor") == "random_resnet18"):
        chosen.append("Cluster relabelling may use the fallback feature extractor, an untrained ResNet-18, where "
                      "the ImageNet ResNet-152 weights are missing; each defend notebook names the extractor "
                      "that ran (defend.yaml: relabel).")
    return chosen


def kept_departures(settings: dict) -> list[str]:
    """The departures this implementation keeps whatever the settings, for what the run uses."""
    algorithms = set(settings["grid"]["nas_algorithms"])
    kept = [sentence for algorithm in sorted(algorithms) for sentence in KEPT.get(algorithm, ())]
    if "nsganetv2" in algorithms and settings["search"].get("nsganetv2", {}).get("finetune_epochs"):
        kept.append("NSGANetV2's fine-tuning of each candidate uses plain momentum and a cosine rate stepped per "
                    "epoch, and keeps the classifier; the reference uses Nesterov momentum, steps per batch, and "
                    "replaces its ImageNet classifier (nbutils/nas/nsganetv2.py, FinetunedPathEvaluator).")
    sensitivity = settings.get("metric_sensitivity", {})
    if sensitivity.get("run") and "tenas" in sensitivity.get("algorithms", ("tenas",)):
        kept.append("TE-NAS's linear regions (Table 2) are counted on the same crops and networks for the clean "
                    "and the poisoned data; the authors' script redraws the crops per dataset, so its label-flip "
                    "change is sampling noise (nbutils/studies/tenas_indicators.py).")
    return kept

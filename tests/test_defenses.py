"""Defences: loss-based sanitisation, cluster relabelling, diffusion denoising, and their checks."""
import math

import numpy as np
import pytest
import torch

from nbutils.defenses import denoising
from nbutils.defenses import relabelling
from nbutils.defenses import sanitisation
from nbutils.core.image_dataset import ImageDataset
from nbutils.defenses.defending import DefenseConfig, defend
from nbutils.defenses.relabelling import ExtractorUnavailable


def blobs(per_class=40, classes=3, size=8, seed=0, name="blobs"):
    """Well-separated classes: class c is a bright square in its own corner/quadrant, plus noise."""
    g = torch.Generator().manual_seed(seed)
    n = per_class * classes
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = torch.randint(0, 30, (n, 1, size, size), generator=g)
    half = size // 2
    corners = [(0, 0), (0, half), (half, 0), (half, half)]
    for c in range(classes):
        r, s = corners[c]
        images[labels == c, :, r : r + half, s : s + half] += 200
    return ImageDataset(name, images.clamp(0, 255).to(torch.uint8), labels, tuple(str(c) for c in range(classes)))


# --------------------------------------------------------------------------- sanitisation


def test_drop_counts_are_the_fraction_of_each_class_rounded_halves_up():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    assert sanitisation.drop_counts(labels, 3, 0.5).tolist() == [5, 4, 2]  # 3.5 -> 4, 1.5 -> 2
    assert sanitisation.drop_counts(labels, 4, 0.3).tolist() == [3, 2, 1, 0]  # an absent class drops none


def test_highest_loss_per_class_picks_the_largest_losses_within_each_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    losses = rng.random(200)
    counts = sanitisation.drop_counts(labels, 4, 0.25)
    dropped = sanitisation.highest_loss_per_class(losses, labels, counts)
    for c in range(4):
        members = np.flatnonzero(labels == c)
        expected = members[np.argsort(-losses[members])[: counts[c]]]
        assert set(dropped[labels[dropped] == c]) == set(expected)
    # ties go to the lower index
    tied = sanitisation.highest_loss_per_class(np.zeros(6), np.zeros(6, dtype=int), np.array([2]))
    assert tied.tolist() == [0, 1]


def test_filter_quality_is_precision_and_recall():
    quality = sanitisation.filter_quality(np.array([1, 2, 3, 4]), np.array([2, 4, 9]))
    assert quality["precision"] == 0.5 and quality["recall"] == pytest.approx(2 / 3)
    assert sanitisation.filter_quality(np.array([1]), np.array([], dtype=int))["recall"] is None


def test_sanitise_drops_exactly_the_fraction_per_class_and_prefers_mislabelled_samples():
    clean = blobs(per_class=15, classes=3, size=8, seed=1)
    flipped = np.array([0, 5, 16, 22, 31, 38])  # two per class, moved to the next class
    poisoned = clean.with_replacements(flipped, labels=(clean.labels[flipped] + 1) % 3)
    config = DefenseConfig("sanitise", fraction=0.25, surrogate_epochs=2, surrogate_batch_size=15, surrogate_lr=0.01,
                           surrogate_augment=False, seed=0)
    result = defend(poisoned, config, device="cpu", clean_labels=clean.labels, poison_indices=flipped)
    given = poisoned.labels.numpy()
    dropped = result.arrays["dropped_indices"]
    kept = result.arrays["kept_indices"]
    sizes = np.bincount(given, minlength=3)
    assert np.bincount(given[dropped], minlength=3).tolist() == np.floor(0.25 * sizes + 0.5).astype(int).tolist()
    assert len(result.dataset) == len(poisoned) - len(dropped)
    assert torch.equal(result.dataset.images, poisoned.images[torch.from_numpy(kept)])
    # every obviously mislabelled sample has a higher loss than the median of its (given) class
    losses = result.arrays["losses"]
    for i in flipped:
        assert losses[i] > np.median(losses[given == given[i]])
    assert set(flipped) <= set(dropped.tolist())
    assert result.record["filter"]["recall"] == 1.0
    assert result.record["filter"]["precision"] == pytest.approx(len(flipped) / len(dropped))
    assert result.record["wrong_labels_after"] == 0 and result.record["wrong_labels_before"] == len(flipped)


def test_sanitise_refuses_to_empty_a_class_before_training():
    ds = blobs(per_class=1, classes=3)
    with pytest.raises(ValueError, match="would remove every sample of class 0"):
        defend(ds, DefenseConfig("sanitise", fraction=0.5), device="cpu")


# --------------------------------------------------------------------------- relabelling


def test_kmeans_on_separated_clusters_recovers_them():
    rng = np.random.default_rng(0)
    centres = np.eye(5, 16) * 10
    truth = np.repeat(np.arange(5), 30)
    features = centres[truth] + rng.normal(scale=0.3, size=(150, 16))
    ids = relabelling.kmeans_labels(features, 5, seed=0)
    scores = relabelling.agreement(ids, truth, 5)
    assert scores["ari"] > 0.99 and scores["matched_agreement"] == 1.0


def test_best_matching_inverts_a_permutation():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    permutation = np.array([2, 0, 1])
    mapping = relabelling.best_matching(permutation[labels], labels, 3)
    assert (mapping[permutation[labels]] == labels).all()


def test_relabel_with_the_fallback_recovers_separated_image_classes_and_erases_flips():
    clean = blobs(per_class=30, classes=3, size=8, seed=2)
    flipped = np.arange(0, 90, 3)  # a third of the labels moved to another class
    poisoned = clean.with_replacements(flipped, labels=(clean.labels[flipped] + 1) % 3)
    config = DefenseConfig("relabel", extractor="random_resnet18", seed=0)
    result = defend(poisoned, config, device="cpu", clean_labels=clean.labels, poison_indices=flipped)
    record = result.record
    assert record["extractor"] == "random_resnet18" and not record["fallback_used"]
    assert record["vs_clean_labels"]["ari"] > 0.95
    assert record["poisons_clean_class_recovered"] > 0.95
    # the numbering follows the given labels, so most new labels equal the clean ones here
    assert (result.dataset.labels == clean.labels).float().mean() > 0.95
    assert torch.equal(result.dataset.images, poisoned.images)


def test_relabel_without_pretrained_weights_fails_unless_fallback_is_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    ds = blobs(per_class=10, classes=2)
    with pytest.raises(ExtractorUnavailable, match="allow_fallback"):
        defend(ds, DefenseConfig("relabel"), device="cpu")
    result = defend(ds, DefenseConfig("relabel", allow_fallback=True), device="cpu")
    assert result.record["extractor"] == "random_resnet18" and result.record["fallback_used"]
    assert result.record["fallback_reason"].startswith("ImageNet ResNet-152 weights not found in " + str(tmp_path))
    # a weights file named explicitly never falls back
    missing = DefenseConfig("relabel", allow_fallback=True, extractor_weights=str(tmp_path / "none.pth"))
    with pytest.raises(ExtractorUnavailable, match="none.pth"):
        defend(ds, missing, device="cpu")


def test_resnet152_loads_weights_from_a_local_file_and_rejects_other_files(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet152(weights=None)
    path = tmp_path / "resnet152.pth"
    torch.save(reference.state_dict(), path)
    model, found = relabelling.load_resnet152_imagenet(path)
    assert found == path and isinstance(model.fc, torch.nn.Identity)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    features = relabelling.imagenet_features(model, images, image_size=32, device="cpu")
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision ResNet-152"):
        relabelling.load_resnet152_imagenet(tmp_path / "other.pth")


# --------------------------------------------------------------------------- denoising


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.25, 0.5])
def test_sigma_to_timestep_is_the_first_step_reaching_twice_sigma(schedule, sigma):
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule).alphas_cumprod.double()
    t = denoising.timestep_for_sigma(abar, sigma)
    ratio = [math.sqrt((1 - float(a)) / float(a)) for a in abar]  # the reference formula, step by step
    assert ratio[t] >= 2 * sigma
    assert all(r < 2 * sigma for r in ratio[:t])
    # the reference's loop (t = 1, 2, ... while the ratio is below 2 sigma) agrees away from t = 0
    ref = 0
    while True:
        ref += 1
        if ratio[ref] >= 2 * sigma:
            break
    assert t == ref


def test_sigma_beyond_the_schedule_is_refused():
    abar = denoising.ddpm_scheduler(10).alphas_cumprod
    with pytest.raises(ValueError, match="choose sigma <="):
        denoising.timestep_for_sigma(abar, 0.9)
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        denoising.timestep_for_sigma(abar, 0.0)


class _Oracle(torch.nn.Module):
    """A UNet stand-in whose epsilon prediction is exact for a known clean image ``x0``."""

    def __init__(self, x0, abar, channels):
        super().__init__()
        self.x0, self.abar = x0, abar
        self.config = type("Config", (), {"in_channels": channels, "out_channels": channels, "sample_size": x0.shape[-1]})

    def forward(self, x_t, t):
        a = self.abar[t].view(-1, 1, 1, 1).float()
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps})


def test_one_shot_x0_prediction_inverts_an_exact_noise_prediction():
    scheduler = denoising.ddpm_scheduler(1000)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    x0 = images.float() / 127.5 - 1
    out, t = denoising.one_shot_denoise(images, _Oracle(x0, scheduler.alphas_cumprod, 1), scheduler, 0.1, seed=0)
    assert t == denoising.timestep_for_sigma(scheduler.alphas_cumprod, 0.1)
    assert (out.int() - images.int()).abs().max() <= 1  # exact up to float rounding and uint8 quantisation


def test_one_shot_denoising_with_a_tiny_unet_on_the_cpu_keeps_shape_and_range():
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    unet = denoising.small_unet(8, 3, width=8, seed=0)
    scheduler = denoising.ddpm_scheduler(100)
    a, t = denoising.one_shot_denoise(images, unet, scheduler, 0.1, seed=3, batch_size=2)
    b, _ = denoising.one_shot_denoise(images, unet, scheduler, 0.1, seed=3, batch_size=2)
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, images)


def test_denoise_defence_trains_a_ddpm_on_trusted_images_and_scores_the_perturbation():
    clean = blobs(per_class=8, classes=2, size=8, seed=4)
    trusted = blobs(per_class=8, classes=2, size=8, seed=5)
    poison_idx = np.array([0, 3, 9])
    g = torch.Generator().manual_seed(0)
    bumped = (clean.images[poison_idx].int() + torch.randint(-16, 17, (3, 1, 8, 8), generator=g)).clamp(0, 255)
    poisoned = clean.with_replacements(poison_idx, images=bumped.to(torch.uint8))
    config = DefenseConfig("denoise", ddpm_trusted_size=12, ddpm_epochs=1, ddpm_batch_size=8, ddpm_width=8,
                           ddpm_timesteps=100, seed=0)
    result = defend(poisoned, config, device="cpu", clean_images=clean.images, poison_indices=poison_idx, trusted=trusted)
    out = result.dataset
    assert out.images.dtype == torch.uint8 and out.images.shape == poisoned.images.shape
    assert torch.equal(out.labels, poisoned.labels)
    record = result.record
    assert record["ddpm"]["trusted_images"] == 12 and "trained here" in record["ddpm"]["source"]
    expected_change = ((out.images.double() - poisoned.images.double()) / 255).square().mean().item()
    assert record["mean_squared_change"] == pytest.approx(expected_change)
    removed = result.arrays["perturbation_removed"]
    p, d, c = (z[poison_idx].double().flatten(1) for z in (poisoned.images, out.images, clean.images))
    expected = 1 - (d - c).norm(dim=1) / (p - c).norm(dim=1)
    np.testing.assert_allclose(removed, expected.numpy())


def test_denoise_defence_uses_a_local_pretrained_ddpm_folder_as_saved(tmp_path):
    unet = denoising.small_unet(8, 1, width=8, seed=1)
    scheduler = denoising.ddpm_scheduler(100)
    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "scheduler")
    ds = blobs(per_class=3, classes=2)
    result = defend(ds, DefenseConfig("denoise", ddpm_path=str(tmp_path), seed=2), device="cpu")
    assert result.record["ddpm"] == {"source": "pretrained", "path": str(tmp_path)}
    expected, t = denoising.one_shot_denoise(ds.images, unet, scheduler, 0.1, seed=2)
    assert torch.equal(result.dataset.images, expected) and result.record["timestep"] == t
    rgb = ImageDataset("rgb", torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ("a", "b"))
    with pytest.raises(ValueError, match="the DDPM takes 1 channels .* images have 3 channels"):
        defend(rgb, DefenseConfig("denoise", ddpm_path=str(tmp_path)), device="cpu")


def test_perturbation_removed_known_answers():
    clean = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    poisoned = torch.full((3, 1, 2, 2), 10, dtype=torch.uint8)
    poisoned[2] = 0  # an unchanged image has nothing to remove
    denoised = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 5.0), torch.zeros(1, 2, 2)]).to(torch.uint8)
    removed = denoising.perturbation_removed(poisoned, denoised, clean)
    assert removed[0] == 1.0 and removed[1] == 0.5 and np.isnan(removed[2])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "prune"}, "DefenseConfig.name = 'prune': Input should be 'sanitise', 'relabel' or 'denoise'"),
        ({"name": "sanitise", "fraction": 1.0}, "fraction = 1.0: Input should be less than 1"),
        ({"name": "sanitise", "fraction": 0}, "fraction = 0: Input should be greater than 0"),
        ({"name": "denoise", "sigma": -0.1}, "sigma = -0.1: Input should be greater than 0"),
        ({"name": "denoise", "sigma": 2.0}, "sigma = 2.0: Input should be less than or equal to 1"),
        ({"name": "relabel", "extractor": "vit"}, "extractor = 'vit': Input should be"),
        ({"name": "denoise", "ddpm_epochs": 0}, "ddpm_epochs = 0: Input should be greater than or equal to 1"),
        ({"name": "denoise", "ddpm_width": 12}, "ddpm_width = 12: Input should be a multiple of 8"),
        ({"name": "relabel", "allow_fallback": "yes"}, "allow_fallback = 'yes': Input should be a valid boolean"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DefenseConfig(**kwargs)


def test_bad_inputs_are_refused_before_compute():
    ds = blobs(per_class=4, classes=2)
    config = DefenseConfig("relabel", extractor="random_resnet18")
    with pytest.raises(ValueError, match="clean_labels must be 8 integers"):
        defend(ds, config, clean_labels=[0, 1])
    with pytest.raises(ValueError, match="poison_indices must lie in \\[0, 8\\)"):
        defend(ds, config, poison_indices=[3, 8])
    with pytest.raises(ValueError, match="clean_images must be uint8"):
        defend(ds, config, clean_images=ds.images.float())
    with pytest.raises(ValueError, match="pass trusted="):
        defend(ds, DefenseConfig("denoise"))
    with pytest.raises(ValueError, match="ddpm_trusted_size is 1000, but trusted holds only 8"):
        defend(ds, DefenseConfig("denoise"), trusted=ds)
    with pytest.raises(ValueError, match="ddpm_path must be a local folder"):
        defend(ds, DefenseConfig("denoise", ddpm_path="/nonexistent/ddpm"))
    with pytest.raises(ValueError, match="choose sigma <="):
        defend(ds, DefenseConfig("denoise", ddpm_timesteps=5, sigma=0.5, ddpm_trusted_size=4), trusted=ds)

"""Diffusion denoising: one-shot x0 prediction of a DDPM at the noise level sigma.

The defence of Hong, Carlini and Kurakin (2024), *Diffusion denoising as a certified defense
against clean-label poisoning*, as the TMLR paper applies it (Table 4, sigma = 0.1): every
training image is noised and then denoised by a diffusion model before anyone trains on it,
which washes out small adversarial perturbations. The computation follows Carlini et al.'s
diffusion denoised smoothing (public reference: ``ethz-spylab/diffusion_denoised_smoothing``):

1. map the image to [-1, 1], ``x = 2 u - 1`` for ``u`` in [0, 1]; noise of standard deviation
   ``sigma`` on ``u`` is ``2 sigma`` on ``x``;
2. choose the first timestep ``t`` of the DDPM's schedule whose noise-to-signal ratio reaches
   that level, ``sqrt((1 - abar_t) / abar_t) >= 2 sigma`` (:func:`timestep_for_sigma`);
3. form ``x_t = sqrt(abar_t) * (x + 2 sigma n)`` with ``n ~ N(0, I)``, a sample of the
   forward process at ``t`` up to the small gap between ``2 sigma`` and the ratio at ``t``;
4. predict ``x_0`` in one step from the UNet's output and clip it to [-1, 1]
   (:func:`one_shot_denoise`), then back to uint8 pixels.

The reference's timestep loop starts at ``t = 1``; :func:`timestep_for_sigma` also considers
``t = 0``, which differs only when ``2 sigma`` is below the ratio at ``t = 0`` (about 0.01 for
the linear schedule, i.e. sigma < 0.005).

The model. A pretrained DDPM is loaded from a local folder (``diffusers`` layout) when one is
given: pretrained weights cannot be downloaded here. Otherwise :func:`train_ddpm` trains a
small ``UNet2DModel`` (no attention, two resolutions) with the DDPM objective (predict the
noise, linear beta schedule) on a clean, trusted set of images that the defender holds out,
by default only on the timesteps up to twice the one used for denoising (see
:func:`train_ddpm`); the defence's record says which model produced the images.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core import deferred_imports
from ..core.image_dataset import ImageDataset, seeded_subset
from ..core.progress import progress
from .result import DefenseResult

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


# --------------------------------------------------------------------------- sigma -> timestep


def noise_ratio(alphas_cumprod: torch.Tensor | np.ndarray) -> np.ndarray:
    """``sqrt((1 - abar_t) / abar_t)`` for every timestep: the noise level of ``x_t / sqrt(abar_t)``."""
    abar = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
    return np.sqrt((1.0 - abar) / abar)


def timestep_for_sigma(alphas_cumprod: torch.Tensor | np.ndarray, sigma: float) -> int:
    """The first timestep ``t`` with ``sqrt((1 - abar_t) / abar_t) >= 2 * sigma``.

    ``sigma`` is the noise level on images in [0, 1]; the DDPM sees [-1, 1], hence ``2 sigma``.
    Raises ValueError when sigma is not positive or the schedule never reaches that level.
    """
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a positive number (noise level on [0, 1] images), got {sigma!r}")
    ratio = noise_ratio(alphas_cumprod)
    reached = np.flatnonzero(ratio >= 2.0 * sigma)
    if reached.size == 0:
        raise ValueError(
            f"sigma = {sigma} needs a noise ratio of {2 * sigma:.4g}, but the DDPM's schedule reaches at most "
            f"{ratio.max():.4g} (at t = {len(ratio) - 1}); choose sigma <= {ratio.max() / 2:.4g}"
        )
    return int(reached[0])


# --------------------------------------------------------------------------- models


def small_unet(image_size: int, channels: int, width: int = 32, seed: int = 0):
    """A small DDPM UNet for ``image_size`` x ``image_size`` images with ``channels`` channels:
    two resolutions (``width``, ``2 * width`` channels), one residual block per level, no
    attention. ``image_size`` must be even (one down-sampling)."""
    if image_size % 2:
        raise ValueError(f"image_size must be even for the small DDPM UNet (one down-sampling), got {image_size}")
    if width < 8 or width % 8:
        raise ValueError(f"ddpm_width must be a multiple of 8 (group norm of 8 groups), got {width}")
    torch.manual_seed(seed)
    return deferred_imports.diffusers().UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        add_attention=False,
    )


def ddpm_scheduler(num_train_timesteps: int = 1000):
    """The DDPM noise schedule used for models trained here: linear betas 1e-4 .. 0.02 (Ho et al.)."""
    return deferred_imports.diffusers().DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", prediction_type="epsilon")


def ddpm_folders(path: str | Path) -> tuple[Path, Path]:
    """The UNet's and the scheduler's folders of a DDPM saved with ``diffusers`` in a local
    folder; a ``ValueError`` naming ``ddpm_path`` and what is missing otherwise. Cheap (no
    model is read), so a run checks it before any compute.

    Accepts a pipeline folder (``unet/`` and ``scheduler/`` subfolders, as ``DDPMPipeline``
    saves) or a model folder holding both ``config.json`` and ``scheduler_config.json``.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"ddpm_path must be a local folder holding a diffusers DDPM, got {str(path)!r} (not a folder)")
    if (root / "unet").is_dir():
        unet_dir, scheduler_dir = root / "unet", root / "scheduler"
    else:
        unet_dir, scheduler_dir = root, root
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"ddpm_path {str(path)!r} holds no UNet: expected {unet_dir / 'config.json'}")
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise ValueError(f"ddpm_path {str(path)!r} holds no scheduler: expected {scheduler_dir / 'scheduler_config.json'}")
    return unet_dir, scheduler_dir


def load_pretrained_ddpm(path: str | Path):
    """A DDPM saved with ``diffusers`` in a local folder (:func:`ddpm_folders`): ``(unet, scheduler)``."""
    unet_dir, scheduler_dir = ddpm_folders(path)
    unet = deferred_imports.diffusers().UNet2DModel.from_pretrained(str(unet_dir))
    scheduler = deferred_imports.diffusers().DDPMScheduler.from_pretrained(str(scheduler_dir))
    log.info("loaded pretrained DDPM from %s (%d timesteps)", path, len(scheduler.alphas_cumprod))
    return unet.eval(), scheduler


def check_model_fits(unet, shape_chw: tuple[int, int, int]) -> None:
    """A UNet must take the images' channels and size (and output the same channels, or twice as many
    when it learns the variance); raises ValueError otherwise."""
    c, h, w = shape_chw
    config = unet.config
    if config.in_channels != c or config.out_channels not in (c, 2 * c):
        raise ValueError(
            f"the DDPM takes {config.in_channels} channels and outputs {config.out_channels}, "
            f"but the images have {c} channels"
        )
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
    if size is not None and size != (h, w):
        raise ValueError(f"the DDPM was made for {size[0]}x{size[1]} images, but the images are {h}x{w}")


def _to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(255.0).mul(2.0).sub(1.0)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def _ddpm_epoch(unet, optimiser: torch.optim.Optimizer, data: torch.Tensor, abar: torch.Tensor, top: int,
                batch_size: int, generator: torch.Generator) -> float:
    """One epoch of DDPM training over ``data`` (in [-1, 1], on the UNet's device), in a random
    order: per batch, timesteps uniform in ``0..top`` and Gaussian noise drawn from ``generator``,
    ``x_t`` formed with the cumulative ``abar``, the noise regressed (MSE). Returns the mean loss."""
    device = data.device
    order = torch.randperm(len(data), generator=generator)
    total, count = 0.0, 0
    for first in range(0, len(order), batch_size):
        x0 = data[order[first : first + batch_size].to(device)]
        t = torch.randint(0, top + 1, (len(x0),), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.item() * len(x0)
        count += len(x0)
    return total / count


def train_ddpm(
    images: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 32,
    num_train_timesteps: int = 1000,
    max_timestep: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
):
    """Train :func:`small_unet` as a DDPM on uint8 ``images`` (N x C x H x W): for each batch draw
    uniform timesteps in ``0..max_timestep`` (default: all ``num_train_timesteps``) and Gaussian
    noise, form ``x_t``, regress the noise (MSE), Adam.

    One-shot denoising queries the model at a single timestep ``t``; training on ``0..2t`` only
    (``max_timestep = 2t``) spends the whole budget near the noise level that is used, which is
    what makes a DDPM trained for a few CPU minutes usable. The objective is the DDPM's, on a
    truncated range of timesteps.

    Returns ``(unet in eval mode, scheduler, history)``; history holds the mean loss per epoch.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty uint8 tensor N x C x H x W, got {images.dtype} {tuple(images.shape)}")
    if epochs < 1:
        raise ValueError(f"ddpm_epochs must be >= 1, got {epochs}")
    top = num_train_timesteps - 1 if max_timestep is None else int(max_timestep)
    if not 0 <= top < num_train_timesteps:
        raise ValueError(f"max_timestep must be in [0, {num_train_timesteps - 1}], got {max_timestep}")
    device = torch.device(device)
    _, c, h, w = images.shape
    if h != w:
        raise ValueError(f"the small DDPM needs square images, got {h}x{w}")
    unet = small_unet(h, c, width, seed).to(device)
    scheduler = ddpm_scheduler(num_train_timesteps)
    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    data = _to_model_range(images).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(unet.parameters(), lr=lr)
    history: list[float] = []
    start = time.perf_counter()
    unet.train()
    for epoch in progress(range(epochs), desc="DDPM epochs"):
        history.append(_ddpm_epoch(unet, optimiser, data, abar, top, batch_size, generator))
        log.info("DDPM epoch %d: noise MSE %.4f", epoch + 1, history[-1])
    log.info("DDPM trained on %d images for %d epochs in %.1f s", len(data), epochs, time.perf_counter() - start)
    return unet.eval(), scheduler, history


# --------------------------------------------------------------------------- denoising


@torch.no_grad()
def one_shot_denoise(
    images: torch.Tensor,
    unet,
    scheduler,
    sigma: float,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> tuple[torch.Tensor, int]:
    """Noise every uint8 image at level ``sigma`` and predict it back in one step.

    Returns ``(denoised uint8 images of the input's shape, the timestep t used)``. The UNet's
    output is read according to the scheduler's ``prediction_type`` (``epsilon``, ``sample``
    or ``v_prediction``); a UNet that also learns the variance (twice the channels) has its
    first half used, as in the reference.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be a uint8 tensor N x C x H x W, got {type(images).__name__} "
            f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
        )
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler's prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction!r}")
    check_model_fits(unet, tuple(images.shape[1:]))
    t = timestep_for_sigma(scheduler.alphas_cumprod, sigma)
    device = torch.device(device)
    abar = float(scheduler.alphas_cumprod[t])
    root_a, root_1ma = math.sqrt(abar), math.sqrt(1.0 - abar)
    unet = unet.to(device).eval()
    channels = images.shape[1]
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty_like(images)
    batches = range(0, len(images), batch_size)
    for first in progress(batches, desc="denoising batches", total=len(batches)):
        x = _to_model_range(images[first : first + batch_size])
        noise = torch.randn(x.shape, generator=generator)
        x_t = (root_a * (x + 2.0 * sigma * noise)).to(device)
        timesteps = torch.full((len(x),), t, dtype=torch.long, device=device)
        output = unet(x_t, timesteps).sample[:, :channels]
        if prediction == "epsilon":
            x0 = (x_t - root_1ma * output) / root_a
        elif prediction == "sample":
            x0 = output
        else:  # v_prediction: v = sqrt(abar) eps - sqrt(1 - abar) x0
            x0 = root_a * x_t - root_1ma * output
        out[first : first + batch_size] = _to_uint8(x0.cpu())
    return out, t


def perturbation_removed(
    poisoned: torch.Tensor, denoised: torch.Tensor, clean: torch.Tensor
) -> np.ndarray:
    """Per image, ``1 - ||denoised - clean|| / ||poisoned - clean||`` (L2 over pixels).

    1 means the perturbation is gone, 0 that the image is as far from the clean one as the
    poison was, negative that denoising moved it further away. Images the attacker did not
    change (``poisoned == clean``) have no perturbation to remove and give NaN.
    """
    if not (poisoned.shape == denoised.shape == clean.shape):
        raise ValueError(
            f"poisoned, denoised and clean images must have one shape, got "
            f"{tuple(poisoned.shape)}, {tuple(denoised.shape)}, {tuple(clean.shape)}"
        )
    p, d, c = (z.double().flatten(1) for z in (poisoned, denoised, clean))
    before = (p - c).norm(dim=1)
    after = (d - c).norm(dim=1)
    removed = torch.full_like(before, float("nan"))
    changed = before > 0
    removed[changed] = 1.0 - after[changed] / before[changed]
    return removed.numpy()


# --------------------------------------------------------------------------- the defence


def check_denoise(poisoned: ImageDataset, config, trusted: ImageDataset | None) -> None:
    """Refuse, before any compute, a DDPM to train without enough trusted images of the right
    shape, or a noise level its schedule cannot reach (a given ``ddpm_path`` is checked when
    it is loaded, still before denoising)."""
    if config.ddpm_path is not None:
        return
    if trusted is None:
        raise ValueError(
            "denoising without ddpm_path trains a small DDPM on clean images the defender holds out: "
            "pass trusted=<clean ImageDataset>, or give ddpm_path: <local diffusers DDPM folder>"
        )
    if not isinstance(trusted, ImageDataset):
        raise ValueError(f"trusted must be an ImageDataset, got {type(trusted).__name__}")
    if trusted.shape_chw != poisoned.shape_chw:
        raise ValueError(f"trusted images must have the poisoned images' shape {poisoned.shape_chw}, got {trusted.shape_chw}")
    if len(trusted) < config.ddpm_trusted_size:
        raise ValueError(
            f"ddpm_trusted_size is {config.ddpm_trusted_size}, but trusted holds only {len(trusted)} images; "
            f"lower ddpm_trusted_size or hold out more clean images"
        )
    c, h, w = poisoned.shape_chw
    if h != w or h % 2:
        raise ValueError(f"the small DDPM needs square images of even size, got {h}x{w}")
    timestep_for_sigma(ddpm_scheduler(config.ddpm_timesteps).alphas_cumprod, config.sigma)  # reachable noise level


def defender_ddpm(poisoned: ImageDataset, config, device: torch.device, trusted: ImageDataset | None):
    """The defender's DDPM: the pretrained one of ``config.ddpm_path``, else a small one trained
    on ``config.ddpm_trusted_size`` of the ``trusted`` images. Returns ``(unet, scheduler, record)``."""
    if config.ddpm_path is not None:
        unet, scheduler = load_pretrained_ddpm(config.ddpm_path)
        check_model_fits(unet, poisoned.shape_chw)
        timestep_for_sigma(scheduler.alphas_cumprod, config.sigma)  # a sigma the schedule cannot reach: fail now
        return unet, scheduler, {"source": "pretrained", "path": config.ddpm_path}
    held_out = seeded_subset(trusted, config.ddpm_trusted_size, seed=config.seed)
    step = timestep_for_sigma(ddpm_scheduler(config.ddpm_timesteps).alphas_cumprod, config.sigma)
    top = min(2 * step, config.ddpm_timesteps - 1) if config.ddpm_train_near_sigma else config.ddpm_timesteps - 1
    unet, scheduler, history = train_ddpm(
        held_out.images, epochs=config.ddpm_epochs, batch_size=config.ddpm_batch_size, lr=config.ddpm_lr,
        width=config.ddpm_width, num_train_timesteps=config.ddpm_timesteps, max_timestep=top, seed=config.seed,
        device=device,
    )
    record = {
        "source": "trained here on clean images held out by the defender (no pretrained DDPM given)",
        "trusted_dataset": trusted.name, "trusted_images": len(held_out), "epochs": config.ddpm_epochs,
        "width": config.ddpm_width, "timesteps": config.ddpm_timesteps, "trained_timesteps": [0, top],
        "final_noise_mse": history[-1],
    }
    return unet, scheduler, record


def score_against_clean(poisoned: torch.Tensor, denoised: torch.Tensor, clean_images: torch.Tensor,
                        poison_indices: np.ndarray | None) -> tuple[dict, dict[str, np.ndarray]]:
    """What denoising did to the distance from the clean images, overall and per poison:
    ``(record entries, arrays)``."""
    to_clean = (denoised.double() - clean_images.double()) / 255.0
    record: dict = {
        "mean_squared_error_to_clean_before": float(((poisoned.double() - clean_images.double()) / 255.0).square().mean()),
        "mean_squared_error_to_clean_after": float(to_clean.square().mean()),
    }
    arrays: dict[str, np.ndarray] = {}
    if poison_indices is not None and poison_indices.size:
        idx = torch.from_numpy(poison_indices)
        removed = perturbation_removed(poisoned[idx], denoised[idx], clean_images[idx])
        arrays["perturbation_removed"] = removed
        defined = removed[np.isfinite(removed)]
        record["perturbation_removed"] = {
            "poisons_with_perturbation": int(defined.size),
            "mean": float(defined.mean()) if defined.size else None,
            "median": float(np.median(defined)) if defined.size else None,
        }
    return record, arrays


def denoise_defense(poisoned: ImageDataset, config, device, clean_labels, clean_images, poison_indices,
                    trusted) -> DefenseResult:
    """The ``denoise`` defence of :func:`nbutils.defenses.defending.defend`: :func:`one_shot_denoise`
    with the defender's DDPM (:func:`defender_ddpm`); scored against the clean images when given."""
    unet, scheduler, ddpm = defender_ddpm(poisoned, config, device, trusted)
    denoised, t = one_shot_denoise(
        poisoned.images, unet, scheduler, config.sigma, seed=config.seed, device=device, batch_size=config.denoise_batch_size,
    )
    change = (denoised.double() - poisoned.images.double()) / 255.0
    record = {
        "sigma": config.sigma,
        "ddpm": ddpm,
        "timestep": t,
        "noise_ratio_at_timestep": float(noise_ratio(scheduler.alphas_cumprod)[t]),
        "mean_squared_change": float(change.square().mean()),  # per pixel, images in [0, 1]
        "mean_squared_noise_added": config.sigma ** 2,  # what a denoiser that removed nothing would leave
    }
    arrays: dict[str, np.ndarray] = {}
    if clean_images is not None:
        scores, arrays = score_against_clean(poisoned.images, denoised, clean_images, poison_indices)
        record.update(scores)
    defended = ImageDataset(poisoned.name, denoised, poisoned.labels, poisoned.classes)
    return DefenseResult(defended, record, arrays)

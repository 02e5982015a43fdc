"""Crafted attacks: surrogate and CLF, GradPC and Gradient Canceling, differentiable augmentation,
the workshop paper's alpha attack, and the poison figures. Tiny networks on 8 x 8 images."""
import copy

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from nbutils.accel.fast_supernet import FastSuperNet
from nbutils.attacks import alpha_attack as aa
from nbutils.attacks import gradient_canceling as gc
from nbutils.attacks import gradpc
from nbutils.attacks.confidence_flip import clf_flips, clf_poison_set
from nbutils.attacks.perturbation import batch_slices, optimise_perturbation, project_
from nbutils.core.poison_set import publish
from nbutils.core.batches import BatchLoader
from nbutils.core.image_dataset import ImageDataset, channel_stats
from nbutils.core.diff_augment import differentiable_augment, translate_flip
from nbutils.space.genotype import published
from nbutils.space.network import EvalNetwork
from nbutils.space.ops import PRIMITIVES
from nbutils.report.poison_figures import flip_table, magnify, poison_grid
from nbutils.training.surrogate import resnet18_small, surrogate_logits, train_surrogate

from toys import toy, toy_supernet

EPS = 16.0


@pytest.fixture(scope="module")
def data():
    ds = toy(24, seed=0)
    mean, std = channel_stats(ds)
    return ds, mean, std


def normalise(images01, mean, std):
    return (images01 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- differentiable augmentation


def test_zero_shift_without_flip_is_the_identity():
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(3)
    out = translate_flip(x, zeros, zeros, torch.zeros(3, dtype=torch.bool))
    assert (out - x).abs().max() < 1e-6
    # the random version with nothing to draw is the identity too
    out = differentiable_augment(x, torch.Generator().manual_seed(1), max_shift=0, flip=False)
    assert (out - x).abs().max() < 1e-6


def test_flip_is_exact_mirroring():
    x = torch.rand(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    out = translate_flip(x, torch.zeros(2), torch.zeros(2), torch.tensor([True, False]))
    assert (out[0] - x[0].flip(-1)).abs().max() < 1e-6
    assert (out[1] - x[1]).abs().max() < 1e-6


def test_integer_shift_moves_pixels_with_zero_padding():
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5  # no zeros inside
    out = translate_flip(x, torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([False]))
    expected = torch.zeros_like(x)
    expected[..., 0:7, 2:8] = x[..., 1:8, 0:6]  # right by 2, up by 1
    assert (out - expected).abs().max() < 1e-6
    # flip first, then shift: out[i, j] = in[i, W - 1 - (j - dx)]
    out = translate_flip(x, torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([True]))
    expected = torch.zeros_like(x)
    expected[..., :, 1:] = x.flip(-1)[..., :, :7]
    assert (out - expected).abs().max() < 1e-6


def test_gradients_flow_through_the_augmentation_and_draws_are_seeded():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = differentiable_augment(x, torch.Generator().manual_seed(5), max_shift=2)
    (out * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # an integer shift is a permutation with zeros: its gradient is the weights shifted back
    y = torch.ones(1, 1, 8, 8, requires_grad=True)
    w = torch.arange(64.0).view(1, 1, 8, 8)
    (translate_flip(y, torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([False])) * w).sum().backward()
    expected = torch.zeros_like(w)
    expected[..., :, :7] = w[..., :, 1:]
    assert torch.allclose(y.grad, expected, atol=1e-5)
    a = differentiable_augment(x.detach(), torch.Generator().manual_seed(5), max_shift=2)
    b = differentiable_augment(x.detach(), torch.Generator().manual_seed(5), max_shift=2)
    c = differentiable_augment(x.detach(), torch.Generator().manual_seed(6), max_shift=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- the shared perturbation optimiser


@pytest.mark.parametrize("signed", [False, True])
def test_optimiser_reaches_the_projected_target(signed):
    """Minimising 0.5 * ||x - target||^2 over the eps-ball around the images and [0, 1]: the
    optimum is the target clipped to both, coordinate by coordinate."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 2, 4, 4, generator=g)
    target = torch.rand(5, 2, 4, 4, generator=g) * 1.4 - 0.2  # some of it outside [0, 1]
    bound = 32 / 255
    expected = torch.minimum(torch.maximum(target, images - bound), images + bound).clamp(0, 1)
    assert (expected != target).float().mean() > 0.3  # the constraints bind on a good share of pixels

    def objective(x):
        return 0.5 * float(((x - target) ** 2).sum()), x - target

    def value(x):
        return objective(x)[0]

    poisoned, history = optimise_perturbation(
        images, objective, eps_pixels=32, steps=300, lr=0.01, signed=signed, lr_milestones=(150, 225),
        final_value=value, keep_best=True,
    )
    assert (poisoned - expected).abs().max() < 2e-3
    assert len(history) == 301 and history[0] == pytest.approx(value(images))
    assert min(history) == pytest.approx(value(expected), rel=1e-4)


def test_optimiser_keeps_the_perturbation_in_the_ball_and_the_images_in_0_1():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(7, 3, 4, 4, generator=g)
    images[0] = 0.0  # at the edges of [0, 1] the box binds before the ball
    images[1] = 1.0
    bound = 8 / 255
    seen = []

    def objective(x):  # large random gradients push every pixel hard in both directions
        seen.append(x.clone())
        return float(x.sum()), torch.randn(x.shape, generator=g) * 100

    poisoned, history = optimise_perturbation(images, objective, eps_pixels=8, steps=20, lr=0.05)
    assert len(history) == len(seen) == 20 and torch.equal(seen[0], images)  # starts at zero perturbation
    for x in seen[1:] + [poisoned]:
        assert (x - images).abs().max() <= bound + 1e-6
        assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
    assert poisoned.min() >= 0 and poisoned.max() <= 1  # the returned images exactly in [0, 1]
    assert ((poisoned - images).abs() > bound - 1e-6).float().mean() > 0.5  # the ball binds
    assert (poisoned[0] >= 0).all() and (poisoned[0] > 0).any() and (poisoned[1] < 1).any()
    # the projection alone, on a perturbation outside both sets
    delta = torch.randn(images.shape, generator=g)
    project_(delta, images, bound)
    assert delta.abs().max() <= bound + 1e-6
    assert (images + delta).min() >= -1e-6 and (images + delta).max() <= 1 + 1e-6
    # eps = 0 leaves the images as they are
    still, _ = optimise_perturbation(images, objective, eps_pixels=0, steps=3, lr=0.05)
    assert torch.equal(still, images)
    assert batch_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    with pytest.raises(ValueError):
        optimise_perturbation(images, objective, eps_pixels=300, steps=1, lr=0.05)


# --------------------------------------------------------------------------- surrogate and CLF


def clf_fixture():
    logits = torch.tensor([
        [1.0, 0.0, -1.0],   # 0: max 1.0, least likely 2
        [0.0, 3.0, 0.5],    # 1: max 3.0, least likely 0
        [0.5, 2.0, -2.0],   # 2: max 2.0, least likely 2 == its label -> next least likely, 0
        [3.0, -1.0, -1.0],  # 3: max 3.0 (tie with 1, later index), least likely tie 1/2 -> 1
        [0.0, 0.0, 0.0],    # 4: max 0.0, all equal with label 0 -> 1
        [-1.0, 2.5, 0.0],   # 5: max 2.5, least likely 0
    ])
    labels = torch.tensor([0, 1, 2, 0, 0, 1])
    ds = ImageDataset("clf", torch.zeros(6, 1, 8, 8, dtype=torch.uint8), labels, ("a", "b", "c"))
    return ds, logits


@pytest.mark.parametrize(
    "budget,indices,labels",
    [
        (1 / 6, [1], [0]),                      # tie on confidence: the lower index wins
        (0.5, [1, 3, 5], [0, 1, 0]),
        (4 / 6, [1, 2, 3, 5], [0, 0, 1, 0]),    # 2: arg-min is its own label
        (1.0, [0, 1, 2, 3, 4, 5], [2, 0, 0, 1, 1, 0]),
    ],
)
def test_clf_flips_the_most_confident_to_their_least_likely_class(budget, indices, labels):
    ds, logits = clf_fixture()
    idx, new = clf_flips(ds, logits, budget)
    assert idx.tolist() == indices and new.tolist() == labels
    assert (new != ds.labels[idx]).all()
    poison_set = clf_poison_set(ds, logits, budget)
    assert poison_set.images is None and poison_set.indices.tolist() == indices


def test_clf_refuses_mismatched_logits():
    ds, logits = clf_fixture()
    with pytest.raises(ValueError):
        clf_flips(ds, logits[:5], 0.5)
    with pytest.raises(ValueError):
        clf_flips(ds, logits[:, :2], 0.5)


def test_resnet18_small_and_surrogate_training_are_seeded(data):
    ds, mean, std = data
    model = resnet18_small(num_classes=3, in_channels=1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity)
    small = ds.subset(range(6))
    kwargs = dict(epochs=1, batch_size=6, lr=0.05, seed=3, device="cpu")
    a = train_surrogate(small, **kwargs)
    b = train_surrogate(small, **kwargs)
    assert not a.training
    la = surrogate_logits(a, small, mean, std, "cpu", batch_size=5)
    lb = surrogate_logits(b, small, mean, std, "cpu")
    assert la.shape == (6, 3) and torch.allclose(la, lb, atol=1e-5)
    assert not torch.allclose(la, surrogate_logits(resnet18_small(3, 1).eval(), small, mean, std, "cpu"))


# --------------------------------------------------------------------------- GradPC and Gradient Canceling


@pytest.fixture(scope="module")
def trained_net(data):
    ds, mean, std = data
    torch.manual_seed(0)
    net = EvalNetwork(published("DARTS_V2"), channels=4, num_classes=3, layers=3, in_channels=1, input_size=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loader = BatchLoader(ds, 8, shuffle=True, seed=0, mean=mean, std=std)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            gradpc.classification_loss(net, x, y).backward()
            opt.step()
    return net


def full_loss(model, ds, mean, std, values=None, names=None):
    """Training loss on the whole set in one batch (train-mode BN, as GradPC sees it)."""
    work = copy.deepcopy(model).train()
    if values is not None:
        own = dict(work.named_parameters())
        with torch.no_grad():
            for n, v in zip(names, values):
                own[n].copy_(v)
    x = normalise(ds.images.float() / 255, mean, std)
    with torch.no_grad():
        return gradpc.classification_loss(work, x, ds.labels).item()


@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_gradpc_increases_the_training_loss_within_its_bound(trained_net, data, epsilon):
    ds, mean, std = data
    before = copy.deepcopy(trained_net)
    names = gc.target_parameter_names(trained_net, "weights")
    assert names and not any(n.startswith("auxiliary") for n in names)
    named = dict(trained_net.named_parameters())
    params = [named[n] for n in names]
    loader = BatchLoader(ds, 24, shuffle=False, seed=0, mean=mean, std=std)
    values = gradpc.gradpc_target(trained_net, params, None, loader, epsilon=epsilon, steps=4, step_size=0.2)
    offset = torch.sqrt(sum(((v - p.detach()) ** 2).sum() for v, p in zip(values, params)))
    assert offset <= epsilon * (1 + 1e-5)
    assert offset >= min(epsilon, 0.2) * 0.99  # it did move (bounded by the ball or by the steps)
    assert full_loss(trained_net, ds, mean, std, values, names) > full_loss(trained_net, ds, mean, std) + 1e-3
    assert state_equal(trained_net, before)  # the caller's model is untouched


def test_gc_batched_gradient_equals_the_unbatched_one(trained_net, data):
    """The two-pass batched chain rule gives the gradient of the objective over *all* poisons."""
    ds, mean, std = data
    target = {n: p.detach() + 0.01 for n, p in trained_net.named_parameters() if not n.startswith("auxiliary")}
    images = ds.images[16:].float() / 255
    labels = ds.labels[16:]
    clean = list(BatchLoader(ds.subset(range(16)), 8, shuffle=False, seed=0, mean=mean, std=std))
    common = dict(budget=0.25, mean=mean, std=std, device="cpu", train_mode=False, with_grad=True)
    whole_value, whole_grad = gc.gc_objective(trained_net, target, clean, images, labels, batch_size=8, **common)
    parts_value, parts_grad = gc.gc_objective(trained_net, target, clean, images, labels, batch_size=3, **common)
    assert whole_value == pytest.approx(parts_value, rel=1e-5)
    assert whole_grad.abs().max() > 0
    assert torch.allclose(parts_grad, whole_grad, rtol=1e-4, atol=1e-7 * whole_grad.abs().max().item())
    # the value, computed independently: 0.5 * ||0.75 g_clean + 0.25 g_adv||^2 in eval mode
    work = copy.deepcopy(trained_net).eval()
    own = dict(work.named_parameters())
    with torch.no_grad():
        for n, v in target.items():
            own[n].copy_(v)
    theta = [own[n] for n in target]
    x_clean = normalise(ds.images[:16].float() / 255, mean, std)
    g_clean = torch.autograd.grad(gradpc.classification_loss(work, x_clean, ds.labels[:16]), theta)
    g_adv = torch.autograd.grad(gradpc.classification_loss(work, normalise(images, mean, std), labels), theta)
    value = 0.5 * sum(((0.75 * a + 0.25 * b) ** 2).sum() for a, b in zip(g_clean, g_adv)).item()
    assert whole_value == pytest.approx(value, rel=1e-4)


def test_gradient_canceling_on_trained_weights(trained_net, data):
    ds, mean, std = data
    before = copy.deepcopy(trained_net)
    victims = torch.arange(12, 24)  # p = 0.5; two poison batches of 6
    poison_set = gc.craft_gradient_canceling(
        ds, victims, trained_net, target="weights", eps=EPS, steps=20, lr=0.02, batch_size=6,
        gradpc_epsilon=0.2, gradpc_steps=3, gradpc_step_size=0.5, seed=0,
    )
    history = poison_set.header["crafting"]["gc_history"]
    assert len(history) == 21
    assert history[-1] < 0.75 * history[0]
    assert torch.equal(poison_set.indices, victims)
    assert torch.equal(poison_set.labels, ds.labels[victims])  # clean-label
    delta = poison_set.images.int() - ds.images[victims].int()
    assert delta.abs().max() <= EPS and delta.abs().max() > 0
    assert poison_set.images.dtype == torch.uint8
    assert state_equal(trained_net, before)


@pytest.fixture(scope="module")
def tiny_supernet():
    torch.manual_seed(0)
    return toy_supernet()


def test_nas_specific_gc_on_supernet_alphas(tiny_supernet, data):
    ds, mean, std = data
    names = gc.target_parameter_names(tiny_supernet, "alphas")
    assert names == ["alpha_normal", "alpha_reduce"]
    loader = BatchLoader(ds.subset(range(16)), 16, shuffle=False, seed=0, mean=mean, std=std)
    values = gradpc.gradpc_target(tiny_supernet, tiny_supernet.arch_parameters(), None, loader, epsilon=1.0, steps=1)
    offset = torch.sqrt(sum(((v - a.detach()) ** 2).sum() for v, a in zip(values, tiny_supernet.arch_parameters())))
    assert 0.99 < offset <= 1.0 + 1e-5
    target = gc.named_targets(tiny_supernet, tiny_supernet.arch_parameters(), values)
    victims = torch.arange(16, 24)
    images, history = gc.gradient_canceling(
        tiny_supernet, target, loader, ds.images[victims].float() / 255, ds.labels[victims],
        budget=1 / 3, eps_pixels=EPS, steps=6, lr=0.01, mean=mean, std=std, batch_size=8, device="cpu", seed=0,
    )
    assert min(history) < 0.8 * history[0]
    quantised = publish(images * 255, ds.images[victims].float(), EPS).int()
    assert (quantised - ds.images[victims].int()).abs().max() <= EPS


def test_nas_specific_gc_is_the_same_on_the_fast_supernet(tiny_supernet, data):
    """The crafted attacks run on FastSuperNet: the GC objective and its gradient in the poison
    images (a second-order quantity) equal the plain supernet's to float32 rounding."""
    ds, mean, std = data
    plain = copy.deepcopy(tiny_supernet)
    fast = FastSuperNet(**tiny_supernet.construction())
    fast.load_state_dict(plain.state_dict())
    target = gc.named_targets(plain, plain.arch_parameters(), [a.detach() * 0.5 for a in plain.arch_parameters()])
    victims = torch.arange(16, 24)
    values = []
    for model in (plain, fast):
        loader = BatchLoader(ds.subset(range(16)), 16, shuffle=False, seed=0, mean=mean, std=std)
        values.append(gc.gc_objective(model, target, loader, ds.images[victims].float() / 255, ds.labels[victims],
                                      budget=1 / 3,
                                      mean=mean, std=std, batch_size=4, device="cpu", with_grad=True))
    (v_plain, g_plain), (v_fast, g_fast) = values
    assert v_fast == pytest.approx(v_plain, rel=1e-5)
    scale = g_plain.abs().max()
    assert scale > 0 and (g_fast - g_plain).abs().max() <= 1e-4 * scale   # measured: 4e-6


# --------------------------------------------------------------------------- the workshop paper's alpha attack


def test_selector_marks_convolutions_negative():
    net = toy_supernet()
    row = aa.selector(net, "normal")[0].tolist()
    assert row == [1.0 if op in ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect") else -1.0 for op in PRIMITIVES]
    switches = [("skip_connect", "sep_conv_3x3", "max_pool_3x3")] * 14
    pruned = toy_supernet(switches_normal=switches, switches_reduce=switches)
    assert aa.selector(pruned, "reduce").tolist() == [[1.0, -1.0, 1.0]] * 14


@pytest.fixture(scope="module")
def alpha_run(tiny_supernet, data):
    ds, mean, std = data
    victims = torch.arange(8, 16)
    before = copy.deepcopy(tiny_supernet)
    # Without augmentation: on 8 x 8 random images a 1-pixel shift changes the loss more than
    # 8 steps can, so the deterministic objective is what these tests can check sharply.
    poison_set = aa.craft_alpha_attack(
        ds, victims, [tiny_supernet], eps=EPS, steps=8, lr=0.01, batch_size=8, seed=0, augment=False,
    )
    assert state_equal(tiny_supernet, before)
    return ds, mean, std, victims, poison_set


def test_alpha_attack_loss_decreases(alpha_run):
    *_, poison_set = alpha_run
    history = poison_set.header["crafting"]["alpha_history"]
    assert len(history) == 8
    assert history[-1] < history[0] - 0.3


def test_alpha_attack_moves_the_alpha_gradient_towards_non_convolutions(alpha_run, tiny_supernet):
    ds, mean, std, victims, poison_set = alpha_run
    y = ds.labels[victims]
    clean = aa.alpha_gradient_sums(tiny_supernet, normalise(ds.images[victims].float() / 255, mean, std), y)
    poisoned = aa.alpha_gradient_sums(tiny_supernet, normalise(poison_set.images.float() / 255, mean, std), y)
    assert poisoned["eq2"] < clean["eq2"] - 0.3  # Eq. 2, on the published (quantised) poisons
    assert poisoned["conv"] > clean["conv"] and poisoned["nonconv"] < clean["nonconv"]
    # softmax: per edge the alpha gradient sums to zero, so Eq. 2 = 2 * non-convolution sum
    assert poisoned["eq2"] == pytest.approx(2 * poisoned["nonconv"], abs=1e-5)
    assert torch.equal(poison_set.labels, y)
    delta = poison_set.images.int() - ds.images[victims].int()
    assert delta.abs().max() <= EPS and delta.abs().max() > 0


def test_alpha_attack_averages_the_loss_over_the_ensemble(tiny_supernet, data):
    ds, mean, std = data
    other = toy_supernet(seed=1)
    images, y = ds.images[:4].float() / 255, ds.labels[:4]
    _, history = aa.alpha_gradient_attack(
        [tiny_supernet, other], images, y, eps_pixels=EPS, steps=1, lr=0.01, batch_size=4,
        mean=mean, std=std, device="cpu", seed=0, augment=False,
    )
    x = normalise(images, mean, std)
    single = [aa.alpha_gradient_sums(net, x, y)["eq2"] for net in (tiny_supernet, other)]
    assert history[0] == pytest.approx(np.mean(single), rel=1e-4, abs=1e-7)
    assert single[0] != pytest.approx(single[1], rel=1e-3)


def test_alpha_attack_optimises_through_the_seeded_augmentation(tiny_supernet, data):
    ds, mean, std = data
    images, y = ds.images[:4].float() / 255, ds.labels[:4]
    _, history = aa.alpha_gradient_attack(
        [tiny_supernet], images, y, eps_pixels=EPS, steps=1, lr=0.01, batch_size=4,
        mean=mean, std=std, device="cpu", seed=7, augment=True,
    )
    augmented = differentiable_augment(images, torch.Generator().manual_seed(7))
    assert not torch.allclose(augmented, images)
    expected = aa.alpha_gradient_sums(tiny_supernet, normalise(augmented, mean, std), y)["eq2"]
    assert history[0] == pytest.approx(expected, rel=1e-4, abs=1e-7)


# --------------------------------------------------------------------------- figures


@pytest.mark.parametrize("channels", [1, 3])
def test_poison_grid_has_one_axis_per_image_and_row(channels):
    ds = toy(10, seed=0, channels=channels)
    clean = ds.images
    noise = publish(clean.float() + 9, clean.float(), EPS)
    gc_like = publish(clean.float() - 16, clean.float(), EPS)
    fig = poison_grid(clean, {"Noise": noise, "GC": gc_like}, count=4, seed=1, eps=EPS)
    assert len(fig.axes) == (1 + 2 * 2) * 4
    fig = poison_grid(clean, {"Noise": noise}, count=3, magnify_perturbations=False)
    assert len(fig.axes) == 2 * 3


def test_magnify_maps_the_bound_to_black_and_white():
    assert magnify(np.array([-16.0, 0.0, 16.0, 40.0]), 16).tolist() == [0.0, 0.5, 1.0, 1.0]


def test_flip_table_counts_old_against_new_labels():
    table = flip_table([0, 0, 1, 2, 2, 2], [1, 1, 2, 0, 1, 2], ["cat", "dog", "emu"])
    assert table.loc["cat", "dog"] == 2 and table.loc["dog", "emu"] == 1
    assert table.loc["emu", "cat"] == 1 and table.loc["emu", "dog"] == 1 and table.loc["emu", "emu"] == 1
    assert int(table.to_numpy().sum()) == 6 and table.loc["cat", "cat"] == 0
    assert list(table.index) == ["cat", "dog", "emu"] and table.index.name == "old label"

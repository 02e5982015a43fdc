"""Mixed precision in the DARTS search steps (nbutils.nas.darts.Precision).

There is no GPU here: float16 autocast runs on CUDA only, so the tests check that asking for it
on the CPU searches in float32 (same result, a warning), and exercise the autocast and
gradient-scaling code path itself with the CPU's bfloat16 autocast and an enabled scaler."""
import logging

import pytest
import torch

from nbutils.nas.darts import (
    DartsConfig,
    Precision,
    StepRule,
    architecture_step,
    darts_search,
    first_order_alpha_grad,
    make_optimisers,
    weight_step,
)
from nbutils.core.device import MixedPrecision
from nbutils.pipeline.params import SearchParams
from nbutils.nas.pdarts import PdartsConfig

from toys import toy, toy_supernet


def _tiny_config(**kwargs) -> DartsConfig:
    return DartsConfig(epochs=1, channels=4, layers=3, batch_size=16, **kwargs)


def test_mixed_precision_on_the_cpu_searches_in_float32_and_says_so(caplog):
    weight_part, arch_part = toy(32, seed=1), toy(32, seed=2)
    cpu = torch.device("cpu")
    plain = darts_search(weight_part, arch_part, _tiny_config(), seed=0, device=cpu)
    with caplog.at_level(logging.WARNING, logger="nbutils.core.device"):
        asked = darts_search(weight_part, arch_part, _tiny_config(mixed_precision=True), seed=0, device=cpu)
    assert "mixed_precision applies on CUDA only" in caplog.text
    assert asked.history[-1]["train_loss"] == plain.history[-1]["train_loss"]
    assert all((asked.arrays[k] == plain.arrays[k]).all() for k in plain.arrays)


def test_autocast_and_scaled_steps_track_float32():
    """One weight step and one first-order architecture step under bfloat16 autocast with
    enabled gradient scalers move the parameters like the float32 steps (bfloat16 keeps ~3
    significant digits), and the alpha gradient comes back unscaled."""
    torch.manual_seed(0)
    base = toy_supernet()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    moved = {}
    for name, precision in (("float32", Precision()), ("mixed", Precision(MixedPrecision(True, "cpu", torch.bfloat16)))):
        model = toy_supernet()
        model.load_state_dict(base.state_dict())
        w_opt, _, a_opt = make_optimisers(model, _tiny_config())
        architecture_step(model, a_opt, w_opt, (x, y), (x, y), StepRule(), precision)
        weight_step(model, w_opt, (x, y), 5.0, precision)
        moved[name] = (torch.cat([a.detach().flatten() for a in model.arch_parameters()]),
                       torch.cat([p.detach().flatten() for p in model.weights()]))
        if precision.enabled:
            assert precision.weights.get_scale() > 1 and precision.alpha.get_scale() > 1   # really scaled
    start_a = torch.cat([a.detach().flatten() for a in base.arch_parameters()])
    start_w = torch.cat([p.detach().flatten() for p in base.weights()])
    step32, step16 = moved["float32"][1] - start_w, moved["mixed"][1] - start_w      # SGD on the weights
    assert torch.nn.functional.cosine_similarity(step32, step16, dim=0) > 0.95
    assert step16.norm() == pytest.approx(step32.norm().item(), rel=0.1)
    # Adam's first step is lr * sign(gradient): the signs must agree wherever the gradient is not tiny
    step32, step16 = moved["float32"][0] - start_a, moved["mixed"][0] - start_a
    flat32 = torch.cat([g.flatten() for g in first_order_alpha_grad(base, (x, y))[0]])
    clear = flat32.abs() > 0.1 * flat32.abs().max()
    assert clear.sum() > 10 and torch.equal(step32[clear].sign(), step16[clear].sign())
    precision = Precision(MixedPrecision(True, "cpu", torch.bfloat16))
    scaled, _, _ = first_order_alpha_grad(base, (x, y), precision)
    scale = precision.alpha.get_scale()
    unscaled = torch.cat([g.flatten() for g in scaled]) / scale
    assert scale > 1 and unscaled.norm() == pytest.approx(flat32.norm().item(), rel=0.1)   # bfloat16: ~2 digits
    assert torch.nn.functional.cosine_similarity(unscaled, flat32, dim=0) > 0.98


def test_mixed_precision_is_refused_with_the_second_order_step():
    with pytest.raises(ValueError, match="first-order search only"):
        _tiny_config(mixed_precision=True, order=2)
    with pytest.raises(ValueError, match="first-order search only"):
        PdartsConfig(mixed_precision=True, order=2)
    with pytest.raises(ValueError, match="set order: 1 in darts"):
        SearchParams(mixed_precision=True, darts={"order": 2})
    assert SearchParams(mixed_precision=True).mixed_precision

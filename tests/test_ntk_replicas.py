"""The NTK rows of a TE-NAS network as replicas (nbutils.nas.ntk_replicas) against the reference
loop, in float64 so that the comparison is tight enough to catch a wrong replica, layout or
weight (float32 rounding alone is ~1e-6)."""
import pytest
import torch

from nbutils.nas.ntk import (
    choose_method,
    ntk_condition_number,
    ntk_condition_number_loop,
    per_sample_gradients,
    per_sample_gradients_loop,
)
from nbutils.nas.ntk_replicas import replica_gradients, supports_replicas
from nbutils.space.supernet import SuperNet
from nbutils.nas.tenas_network import SEARCH_OPERATIONS, TenasNetwork, initial_switches


def _network(channels=1, in_channels=3, stem=True, cells=2, seed=0, switches=None) -> TenasNetwork:
    torch.manual_seed(seed)
    return TenasNetwork(switches or initial_switches(), channels=channels, num_classes=10, in_channels=in_channels,
                        stem=stem, cells=cells).double().train()


def _assert_rows_equal(net, x, **kwargs):
    loop = per_sample_gradients_loop(net, x)
    fast = per_sample_gradients(net, x, method="replicas", **kwargs)
    assert fast.shape == loop.shape
    torch.testing.assert_close(fast, loop, rtol=1e-9, atol=1e-10 * float(loop.abs().max()))


@pytest.mark.parametrize("channels, size, cells", [(1, 16, 2), (2, 8, 2), (1, 8, 3)])
def test_replica_rows_equal_the_loop(channels, size, cells):
    """C = 1 (single-channel convolutions: fused depthwise + scale, replica depthwise) and C = 2
    (grouped pointwise as a block-diagonal product, native and custom depthwise), 2 and 3 cells."""
    torch.manual_seed(1)
    _assert_rows_equal(_network(channels=channels, cells=cells), torch.randn(5, 3, size, size, dtype=torch.float64))


def test_replica_rows_with_removed_operations_and_edges_odd_sizes_and_chunks():
    net = _network()
    x = torch.randn(4, 3, 11, 11, dtype=torch.float64)   # odd: FactorizedReduce pads, the reduction reads odd maps
    edge_ops = [("reduce", 1, op) for op in SEARCH_OPERATIONS]
    with net.without([("normal", 3, "sep_conv_5x5"), ("reduce", 0, "skip_connect"), *edge_ops]):
        _assert_rows_equal(net, x, chunk_size=3)


def test_replica_rows_of_the_thin_network_without_stem():
    torch.manual_seed(2)
    _assert_rows_equal(_network(in_channels=1, stem=False), torch.randn(6, 1, 8, 8, dtype=torch.float64))


def test_replica_kappa_in_float32_agrees_with_the_loop_and_leaves_the_network_unchanged():
    torch.manual_seed(3)
    net = TenasNetwork(initial_switches(), channels=1, num_classes=10, in_channels=3).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(6, 3, 16, 16)
    fast = ntk_condition_number(net, x)
    assert choose_method(net, x) == "replicas"
    loop = ntk_condition_number_loop(net, x)
    assert fast.defined and fast.kappa == pytest.approx(loop.kappa, rel=1e-4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_method_choice_and_refusals():
    tenas = _network()
    small, large = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 16, 16)
    assert supports_replicas(tenas) and not supports_replicas(SuperNet(channels=4, num_classes=10, layers=3))
    assert choose_method(tenas, small) == "vmap"            # below REPLICAS_MIN_PIXELS vmap is faster
    assert choose_method(tenas, large) == "replicas"
    assert choose_method(tenas, large, train_mode=False) == "vmap"
    assert choose_method(SuperNet(channels=4, num_classes=10, layers=3), large) == "vmap"
    with pytest.raises(ValueError, match="method must be one of auto, replicas, vmap"):
        choose_method(tenas, large, method="fast")
    with pytest.raises(ValueError, match="needs a TE-NAS network"):
        per_sample_gradients(SuperNet(channels=4, num_classes=10, layers=3), large, method="replicas")
    with pytest.raises(TypeError, match="TE-NAS networks only"):
        replica_gradients(SuperNet(channels=4, num_classes=10, layers=3), large)
    with pytest.raises(ValueError, match="training mode"):
        replica_gradients(_network().eval(), large.double())

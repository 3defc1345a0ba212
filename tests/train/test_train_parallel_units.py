"""nrcore.parallel and --sync-bn's layer within one process (the cross-process paths are in
test_train_torchrun.py)."""

import pytest
import torch
from torch import nn

from nrcore.models.sync_batchnorm import RankSyncBatchNorm, convert_sync_batchnorm
from nrcore.parallel import Ranks


def test_slices_cover_the_batch_in_order_and_differ_by_at_most_one():
    for total in (1, 7, 64, 101):
        for world in (1, 2, 3, 8):
            bounds = [Ranks(r, world).slice_bounds(total) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_one_process_collectives_are_the_identity():
    ranks = Ranks()
    t = torch.tensor([1.0, 2.0])
    ranks.sum_([t])
    assert ranks.sum(t) is t and ranks.max(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    loss = (torch.tensor([3.0], requires_grad=True) * 2).sum()
    assert ranks.scale_local(loss) is loss


def test_the_sync_layer_in_one_process_is_batchnorm():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    synced = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), Ranks())
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced[1], RankSyncBatchNorm)
    x = torch.randn(8, 3, 10, 10)
    torch.testing.assert_close(synced(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(synced[1].running_var, plain[1].running_var, rtol=1e-5, atol=1e-6)
    synced.eval(), plain.eval()
    torch.testing.assert_close(synced(x), plain(x))


def test_the_sync_layer_keeps_float32_statistics_for_half_inputs():
    """A float16 count of 64 x 32 x 32 = 65536 values overflows (float16 stops at 65504): the
    statistics are float32, the output keeps the input's dtype."""
    layer = RankSyncBatchNorm(2, Ranks())
    x = torch.randn(64, 2, 32, 32).half()
    out = layer(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), nn.BatchNorm2d(2)(x.float()), rtol=0, atol=2e-3)


def test_the_per_example_recorder_refuses_batchnorm_synced_across_processes():
    from nrcore.ops import PerSampleGradRecorder

    model = nn.Sequential(nn.Conv2d(1, 2, 3), RankSyncBatchNorm(2, Ranks(0, 2)), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with pytest.raises(ValueError, match="statistics across processes"):
        PerSampleGradRecorder(model)
    model[1].ranks = Ranks()  # one process: an ordinary BatchNorm to the recorder
    PerSampleGradRecorder(model)

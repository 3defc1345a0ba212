"""Every method computes the same thing whether the run keeps its convolution weights (and so
its activations) in channels-last layout, as CPU runs do by default, or in the default layout:
two steps from the same initialisation on the same batches give the same loss and network."""

import pytest
import torch

from nrcore.methods import registry


# every method with its defaults, and the per-example-gradient recorder's conv path (meta's
# default on this BatchNorm model is forward mode)
CASES = [(name, {}) for name in sorted(registry())] + [("meta", {"hypergrad": "tangent"})]


@pytest.mark.parametrize("method_name,options", CASES, ids=[n + "".join(f":{k}={v}" for k, v in o.items()) for n, o in CASES])
def test_channels_last_changes_no_result(digits_task, run_steps, method_name, options):
    loss_default, method_default = run_steps(digits_task, method_name, options, channels_last=False)
    loss_cl, method_cl = run_steps(digits_task, method_name, options, channels_last=True)
    model_default, model_cl = method_default.eval_model(), method_cl.eval_model()
    conv_weights = [p for p in model_cl.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert any(not p.is_contiguous() for p in conv_weights)  # (a 1-channel weight is both)
    torch.testing.assert_close(loss_cl, loss_default, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(model_default.state_dict().items(), model_cl.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_only_double_backprop_steps_keep_the_default_layout_by_default():
    from nrcore.models import resolve_channels_last

    reg = registry()
    defaults = {name: {o.name: o.default for o in cls.options} for name, cls in reg.items()}
    assert [n for n, cls in reg.items() if not cls.suits_channels_last(defaults[n])] == ["mlc"]
    for name in ("meta", "l2rw", "mwnet"):
        assert not reg[name].suits_channels_last({**defaults[name], "hypergrad": "autograd"})
        assert reg[name].suits_channels_last({**defaults[name], "hypergrad": "tangent"})
    assert resolve_channels_last(None, "cpu", method_suits=False) is False
    assert resolve_channels_last(True, "cpu", method_suits=False) is True  # an explicit flag wins

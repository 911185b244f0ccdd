"""benchmarks/speed.py (issue 12): its settings are meant to change the time, never the numbers. Two
paths: the image gradient of one reconstruction iteration in NCHW and in channels_last, and with oneDNN
on and off, agree to float-order tolerance on a tiny ResNet."""
import pytest
import torch

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def speed():
    return load_benchmark("speed")


@pytest.mark.parametrize("setting", ["channels_last", "no_onednn"])
def test_a_speed_setting_keeps_the_image_gradient(speed, setting):
    args = speed.parse_args(["--width", "4", "--images", "4", "--bs", "2", "--steps", "2", "--device", "cpu"])
    default = speed.build_iteration("default", args)()
    try:
        other = speed.build_iteration(setting, args)()
    finally:
        torch.backends.mkldnn.enabled = True  # no_onednn switches it off process-wide
    assert default.abs().max() > 0
    torch.testing.assert_close(other.contiguous(), default, rtol=1e-4, atol=1e-4 * float(default.abs().max()))

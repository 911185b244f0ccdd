"""benchmarks/speed.py (issue 12): its settings are meant to change the time, never the numbers. Two
paths: the image gradient of one reconstruction iteration in NCHW and in channels_last, and with oneDNN
on and off, agree to float-order tolerance on a tiny ResNet. Each other setting runs as speed.py runs it,
in its own process: channels_last's backward crashes (SIGSEGV) with torch 2.14.1 on some CPUs (AVX2, no
AVX512), and a crash there is a skip that says so, not a dead test run."""
import pytest
import torch

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def speed():
    return load_benchmark("speed")


@pytest.mark.parametrize("setting", ["channels_last", "no_onednn"])
def test_a_speed_setting_keeps_the_image_gradient(speed, setting, tmp_path):
    args = speed.parse_args(["--width", "4", "--images", "4", "--bs", "2", "--steps", "2", "--device", "cpu",
                             "--iterations", "1"])
    default = speed.build_iteration("default", args)()
    grad_file = str(tmp_path / "grad.pt")
    crashed = speed.measure(setting, 1, grad_file, args) is None
    assert not crashed or setting == "channels_last", f"{setting}'s process was killed by a signal"
    if crashed:  # the known torch crash on AVX2-only CPUs
        pytest.skip(f"{setting}'s process crashed on this CPU (torch {torch.__version__}, capability "
                    f"{torch.backends.cpu.get_cpu_capability()}); speed.py prints the cell as crashed")
    other = torch.load(grad_file)
    assert default.abs().max() > 0
    torch.testing.assert_close(other, default.detach().cpu().contiguous(), rtol=1e-4,
                               atol=1e-4 * float(default.abs().max()))


@pytest.mark.parametrize("returncode, crashed", [(-11, True), (-6, True), (-9, False)])
def test_a_crash_is_a_crashed_cell_but_an_out_of_memory_kill_stops_the_table(speed, monkeypatch, returncode, crashed):
    args = speed.parse_args(["--device", "cpu"])
    monkeypatch.setattr(speed.subprocess, "run",
                        lambda *a, **k: speed.subprocess.CompletedProcess(a, returncode, stdout="", stderr=""))
    if crashed:
        assert speed.measure("channels_last", 1, "unused.pt", args) is None
    else:
        with pytest.raises(SystemExit, match="SIGKILL: out of memory"):
            speed.measure("channels_last", 1, "unused.pt", args)

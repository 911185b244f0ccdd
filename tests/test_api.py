"""The Python API (simudy.reconstruct) and recons.py --theta0/--theta_final: a model trained outside
train.py, reconstructed and scored; the API, the CLI on train.py's folder and the CLI on loose files agree."""
import os
import re
import subprocess
import sys

import pytest
import torch

import recons
import simudy
import train
from simudy.errors import UserError
from simudy.runs import THETA0, THETA_FINAL
from tests.conftest import REPO_ROOT


def readme_python_block(section="## Python API"):
    text = (REPO_ROOT / "README.md").read_text()
    body = text[text.index(section):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_readme_python_api_block_runs_as_written(tmp_path):
    """The README's block: a tiny MLP trained by a hand-written loop, reconstructed through the API,
    scored with the metrics functions. It prints its SSIM; 400 iterations reach well above noise."""
    script = tmp_path / "attack.py"
    script.write_text(readme_python_block())
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ssim = float(re.search(r"average SSIM ([0-9.]+)", proc.stdout).group(1))
    assert ssim > 0.6, proc.stdout  # noise scores ~0.01; the README states the measured value
    assert not any(p.name.startswith("simudy_") for p in tmp_path.iterdir())  # no run folder left behind


RECIPE = {"preset": "fast", "rec_epochs": 2, "rec_steps_per_epoch": 3, "save_every": 2, "num_dummy": 12}
RECIPE_FLAGS = ["--preset", "fast", "--rec_epochs", "2", "--rec_steps_per_epoch", "3", "--save_every", "2",
                "--num_dummy", "12"]


def test_api_cli_and_theta_files_agree(mlp_run):
    """Three paths to the same reconstruction: recons.py on train.py's folder, recons.py on the two
    state_dict files with the model and training described by flags, and simudy.reconstruct."""
    flags, train_dir = [str(f) for f in mlp_run.flags], mlp_run.train_dir
    folder_run = recons.main(recons.parse_args(flags + ["--tlr", "0.05"] + RECIPE_FLAGS))
    expected = torch.load(os.path.join(folder_run, "1_2.pth"))
    files = ["--theta0", os.path.join(train_dir, THETA0), "--theta_final", os.path.join(train_dir, THETA_FINAL),
             "--model_name", "mlp", "--width", "16", "--image_shape", "1", "28", "28", "--num_classes", "10",
             "--num_images", "10", "--tlr", "0.05", "--bs", "5", "--epochs", "1", "--recons_dir", "from_files"]
    files_run = recons.main(recons.parse_args(files + RECIPE_FLAGS))
    from_files = torch.load(os.path.join(files_run, "1_2.pth"))
    model = train.build_model("mlp", 10, (1, 28, 28), 16)
    result = simudy.reconstruct(model, torch.load(os.path.join(train_dir, THETA0)),
                                torch.load(os.path.join(train_dir, THETA_FINAL)), num_images=10, lr=0.05,
                                batch_size=5, epochs=1, image_shape=(1, 28, 28), num_classes=10, **RECIPE)
    for got in (from_files["x"], result.images):
        assert torch.equal(got, expected["x"])
    assert torch.equal(result.labels, expected["labels"]) and torch.equal(result.ranking, expected["ranking"])
    assert result.run_dir is not None and not os.path.exists(result.run_dir)  # the temporary folder is gone


def test_theta_file_of_another_model_is_a_one_line_error(mlp_run):
    flags, train_dir = [str(f) for f in mlp_run.flags], mlp_run.train_dir
    files = ["--theta0", os.path.join(train_dir, THETA0), "--theta_final", os.path.join(train_dir, THETA_FINAL),
             "--model_name", "mlp", "--width", "32", "--image_shape", "1", "28", "28", "--recons_dir", "x"]
    with pytest.raises(UserError) as e:
        recons.main(recons.parse_args(files))
    message = str(e.value)
    assert "\n" not in message and THETA0 in message and "--width" in message
    with pytest.raises(UserError, match="both --theta0"):
        recons.main(recons.parse_args(files[:2] + ["--recons_dir", "x"]))


def test_unknown_api_option_names_the_known_ones():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(TypeError, match="rec_steps_per_epoch"):
        simudy.reconstruct(model, model.state_dict(), model.state_dict(), num_images=2, lr=0.1, batch_size=2,
                           epochs=1, image_shape=(1, 2, 2), num_classes=2, rec_step=3)


def test_api_refuses_a_negative_smoothing_noise_in_one_line():
    """The API meets the same one-line error as recons.py's --smooth_sigma check, before any iteration."""
    model = torch.nn.Linear(4, 2)
    with pytest.raises(UserError, match="pass a noise std >= 0") as e:
        simudy.reconstruct(model, model.state_dict(), model.state_dict(), num_images=2, lr=0.1, batch_size=2,
                           epochs=1, image_shape=(1, 2, 2), num_classes=2, smooth_sigma=-0.1)
    assert "\n" not in str(e.value)

"""benchmarks/objective.py (issue 12, "check the objective before the optimiser"): its tables on a tiny
train.py run. Two paths: the --draws table's draw k is the single-draw table's row at seed + k."""
import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def objective():
    return load_benchmark("objective")


def test_the_truth_is_the_optimum_and_draws_repeat_the_single_draw_rows(objective, mlp_run):
    single = {seed: objective.main(objective.parse_args(["--train_dir", mlp_run.train_dir, "--sigmas", "0", "0.3",
                                                         "1.0", "--seed", str(seed)]))
              for seed in (4, 5)}
    assert abs(single[4][0]["global"]) < 1e-5 and single[4][0]["ssim"] == pytest.approx(1.0)
    assert single[4][2]["global"] > single[4][1]["global"] > 1e-4  # more noise, farther from the truth
    rows = objective.main(objective.parse_args(["--train_dir", mlp_run.train_dir, "--sigmas", "0", "0.3", "1.0",
                                                "--seed", "4", "--draws", "2"]))
    assert [r["sigma"] for r in rows] == [0.3, 1.0]  # sigma 0 has no spread to show
    for row, k in zip(rows, (1, 2)):
        assert row["losses"] == pytest.approx([single[4][k]["global"], single[5][k]["global"]], rel=1e-5)
        assert row["ssim"] == pytest.approx(single[4][k]["ssim"])
        assert row["mean"] == pytest.approx(sum(row["losses"]) / 2)

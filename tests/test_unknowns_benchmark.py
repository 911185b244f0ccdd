"""benchmarks/unknowns.py's own bookkeeping (issue 15): the scores its README tables are made of, and its
resumable results file. The reconstruction functions it calls are tested in test_search / test_method."""
import math

import pytest
import torch

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def unknowns():
    return load_benchmark("unknowns")


def test_within_one_step_agrees_with_the_log_distance_to_the_neighbours(unknowns):
    grid = unknowns.CANDIDATE_LRS
    for k, true in enumerate(grid):
        low, high = grid[max(0, k - 1)], grid[min(len(grid) - 1, k + 1)]
        for estimate in torch.logspace(math.log10(grid[0] / 3), math.log10(grid[-1] * 3), 97).tolist():
            by_log = math.log(low) - 1e-9 <= math.log(estimate) <= math.log(high) + 1e-9
            assert unknowns.within_one_step(estimate, true) == by_log, (estimate, true)


def test_score_counts_the_lr_within_a_step_and_the_exact_bs(unknowns):
    rows = [{"config": "A", "true_lr": 5e-3, "true_bs": 20, "pick": (9e-3, 20)},   # lr ok, bs ok
            {"config": "A", "true_lr": 5e-3, "true_bs": 10, "pick": (1.1e-2, 10)},  # lr two steps off
            {"config": "A", "true_lr": 2e-2, "true_bs": 10, "pick": (2e-2, 20)},    # bs wrong
            {"config": "D", "true_lr": 2e-2, "true_bs": 10, "pick": (2e-2, 10)}]    # another config
    assert unknowns.score(rows, lambda r: r["pick"], "A") == ("2/3", "2/3")
    assert unknowns.score(rows, lambda r: (r["pick"][0], None), "A") == ("2/3", "-")


def test_top_n_precision_and_duplicates_skipped(unknowns):
    assert unknowns.top_n_precision([3, 1, 0, 2], {0, 1}, 2) == 0.5
    assert unknowns.top_n_recall([3, 1, 0, 2], {1}, 2) == 1.0  # the one recovered dummy is in the top 2
    assert unknowns.top_n_recall([3, 1, 0, 2], {1, 0, 2}, 2) == pytest.approx(1 / 3)
    assert math.isnan(unknowns.top_n_recall([3, 1, 0, 2], set(), 2))
    between = torch.eye(4)
    between[0, 1] = between[1, 0] = 0.9  # dummies 0 and 1 look alike
    assert unknowns.skip_duplicates([0, 1, 2, 3], between, 2) == [0, 2]
    assert unknowns.skip_duplicates([0, 1, 2, 3], torch.ones(4, 4), 2) == [0, 1]  # all alike: order kept


def test_rows_are_added_replaced_by_key_and_survive_a_reload(unknowns, tmp_path, monkeypatch):
    monkeypatch.setattr(unknowns, "RESULTS", str(tmp_path / "unknowns.json"))
    assert unknowns.load_results() == [] and not unknowns.done("truth/A/lr0.01/bs20")
    unknowns.save_row({"key": "truth/A/lr0.01/bs20", "value": 1})
    unknowns.save_row({"key": "norm/A/lr0.01/bs20", "value": 2})
    unknowns.save_row({"key": "truth/A/lr0.01/bs20", "value": 3})
    assert sorted((r["key"], r["value"]) for r in unknowns.load_results()) == [
        ("norm/A/lr0.01/bs20", 2), ("truth/A/lr0.01/bs20", 3)]
    assert unknowns.done("norm/A/lr0.01/bs20")

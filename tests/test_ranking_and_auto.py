"""recons.py --num_dummy (ranking dummies by their gradient norm, metrics --top) and --rlr/--rbs auto (the
paper's short-run selection in-process)."""
import csv
import json
import os

import pytest
import torch

import metrics
import recons
import train
from models import build_model
from recons import GRID_SEARCH_STEPS, PAPER_RLR_CANDIDATES, rank_dummies, search_candidates
from utils import AUTO, UserError


def run(module, args):
    return module.main(module.parse_args([str(a) for a in args]))


def test_rank_dummies_orders_by_descending_norm_ties_by_index():
    assert rank_dummies(torch.tensor([1.0, 4.0, 18 ** 0.5, 0.0, 1.0])).tolist() == [2, 1, 0, 4, 3]


@pytest.mark.parametrize("budget", [recons.RANKING_BUDGET_BYTES, 1])  # 1 byte: one dummy per chunk
def test_total_gradient_norms_equal_a_per_dummy_loop(budget):
    """||sum_t grad loss(theta_t; x_j)|| along the graph-free simulation, against autograd one dummy at a
    time, with 7 dummies in batches of 3 (unequal), 2 epochs and momentum."""
    torch.manual_seed(0)
    model = build_model("mlp", 3, (1, 4, 4), 8)
    theta0 = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(7, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    sgd = recons.SGDConfig(lr=0.1, momentum=0.9)
    got = recons.total_gradient_norms(model, theta0, {}, x, y, 3, 2, sgd, budget=budget)
    params, sums = dict(theta0), torch.zeros(7, sum(p.numel() for p in theta0.values()))
    velocity = None
    for _ in range(2):
        for lo in range(0, 7, 3):
            for j in range(lo, min(lo + 3, 7)):
                p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x[j:j + 1],)),
                                                         y[j:j + 1])
                sums[j] += torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(p.values()))])
            new, velocity, _ = recons.sgd_step(model, list(params.values()), velocity, {}, x[lo:lo + 3],
                                               y[lo:lo + 3], sgd)
            params = {k: v.detach() for k, v in zip(params, new)}
    assert torch.allclose(got, sums.norm(dim=1), rtol=1e-5)


def test_search_candidates():
    both = search_candidates(AUTO, AUTO, 0.01, 20, None, None)
    assert both == [(lr, bs) for bs in (10, 20, 40) for lr in PAPER_RLR_CANDIDATES]
    assert PAPER_RLR_CANDIDATES[0] == 0.02 and PAPER_RLR_CANDIDATES[-1] == 0.001 and len(both) == 60
    assert search_candidates(AUTO, 0, 0.01, 20, [0.05, 0.01, 0.05], None) == [(0.05, 20), (0.01, 20)]
    assert search_candidates(0, AUTO, 0.01, 1, None, None) == [(0.01, 1), (0.01, 2)]  # bs // 2 = 0 dropped
    assert search_candidates(0.03, AUTO, 0.01, 5, None, [7]) == [(0.03, 7)]
    with pytest.raises(UserError, match="--rlr_candidates"):
        search_candidates(AUTO, 0, 0.01, 5, [0.0], None)


@pytest.fixture
def mlp_flags(fashion_root, in_tmp_cwd):
    """A trained tiny MLP on N = 10 fake Fashion-MNIST images; the flags that name it."""
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 16,
             "--num_imgs_per_class", 1, "--bs", 5]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 1])
    return flags + ["--tlr", 0.05, "--steps", 2], train_dir


def test_num_dummy_ranks_by_gradient_norm_and_top_scores(mlp_flags):
    flags, train_dir = mlp_flags
    recons_dir = run(recons, flags + ["--num_dummy", 30, "--rec_epochs", 1, "--rec_steps_per_epoch", 2,
                                      "--save_every", 1])
    assert recons_dir.endswith("_ndummy30")
    first, last = (torch.load(os.path.join(recons_dir, f"0_{s}.pth")) for s in (0, 1))
    for snap in (first, last):
        assert snap["x"].shape[0] == 30 and sorted(snap["ranking"].tolist()) == list(range(30))
        assert torch.all(snap["grad_norms"][snap["ranking"]].diff() <= 0)
    # the ranking is by each snapshot's dummies' total gradient over the simulation (clip off)
    run_ = recons.load_training_run(train_dir, torch.device("cpu"))
    norms = recons.total_gradient_norms(run_.model, run_.theta0, run_.buffers, first["x"], first["labels"], 5,
                                        2, recons.sgd_config_from_training(run_.config, 0.05))
    assert torch.allclose(first["grad_norms"], norms, rtol=1e-5)
    with open(os.path.join(recons_dir, "ranking.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["dummy"]) for r in rows] == last["ranking"].tolist()
    assert [int(r["rank"]) for r in rows] == list(range(30))
    assert [int(r["label"]) for r in rows] == last["labels"][last["ranking"]].tolist()

    result = run(metrics, flags + ["--num_dummy", 30, "--top", 20, "--snapshot", "last"])
    assert result["n_recons"] == 20 and result["n_train"] == 10
    matched = torch.load(os.path.join(recons_dir, "metrics", "0_1", "matched.pth"))
    assert set(matched["recon_index"].tolist()) <= set(last["ranking"][:20].tolist())


def test_rlr_auto_picks_lowest_short_run_loss(mlp_flags):
    flags, _ = mlp_flags
    recons_dir = run(recons, flags + ["--rlr", AUTO, "--rlr_candidates", 0.01, 0.05, "--rec_epochs", 1,
                                      "--rec_steps_per_epoch", 2])
    with open(os.path.join(recons_dir, "auto_search.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["rlr"]) for r in rows) == [0.01, 0.05] and {r["rbs"] for r in rows} == {"5"}
    best = min(rows, key=lambda r: float(r["final_loss"]))
    assert all(-1 <= float(r["avg_ssim"]) <= 1 for r in rows)  # train_subset.pth is there: SSIM too
    assert recons_dir.endswith(f"_rbs5_rlr{float(best['rlr'])}_reclr0.01")
    assert os.path.getsize(os.path.join(recons_dir, "auto_search.png")) > 0
    config = json.load(open(os.path.join(recons_dir, "config.json")))
    assert config["rlr"] == float(best["rlr"]) and config["auto_search"]["chosen"]["rlr"] == float(best["rlr"])
    assert len(config["auto_search"]["candidates"]) == 2 and config["auto_search"]["steps"] == GRID_SEARCH_STEPS
    assert os.path.isfile(os.path.join(recons_dir, "0_1.pth"))  # then the full (here 1 x 2) run

    # the search's short run is --grid_search 1's: same start, same final loss
    other = next(r for r in rows if r is not best)
    grid_dir = run(recons, flags + ["--rlr", other["rlr"], "--grid_search", 1])
    grid = json.load(open(os.path.join(grid_dir, "grid_result.json")))
    assert grid["final_loss"] == pytest.approx(float(other["final_loss"]), rel=1e-6)
    assert grid["iterations"] == GRID_SEARCH_STEPS
    # metrics finds the run from the chosen value; 'auto' names no folder
    assert run(metrics, flags + ["--rlr", best["rlr"], "--snapshot", "last"])["n_train"] == 10
    with pytest.raises(UserError, match="--rlr auto names no run folder"):
        run(metrics, flags + ["--rlr", AUTO, "--snapshot", "last"])


@pytest.mark.parametrize("extra,needle", [(["--method", "one_step", "--rlr", AUTO], "drop them for --method"),
                                          (["--rbs", AUTO, "--resume"], "pass the chosen --rlr/--rbs")])
def test_auto_conflicts_are_one_line_errors(extra, needle):
    with pytest.raises(UserError, match=needle) as e:  # before any file is read
        run(recons, ["--model_name", "mlp"] + extra)
    assert "\n" not in str(e.value)


def test_ranking_puts_matched_dummies_first_when_n_is_known(fashion_root, in_tmp_cwd):
    """N = 10 training images, M = 20 dummies (two per class). After the reconstruction, the dummies that
    greedy SSIM matching pairs with a training image carry about twice the total gradient of the others
    (the paper's appendix: 1.55 vs 0.55), and the 10 first-ranked are mostly the matched ones (chance: 5).
    Measured when written: 8 of 10, mean norms 7.06 vs 3.56, average SSIM 0.59."""
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 64,
             "--num_imgs_per_class", 1, "--bs", 10]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 5])
    recons_dir = run(recons, flags + ["--tlr", 0.05, "--steps", 2, "--num_dummy", 20, "--rec_epochs", 1,
                                      "--rec_steps_per_epoch", 600, "--schedule", "cosine", "--tv_weight", 2e-3,
                                      "--clip_epochs", 0, "--save_every", 0])
    snap = torch.load(os.path.join(recons_dir, "0_599.pth"))
    train_images = torch.load(os.path.join(train_dir, "train_subset.pth"))["images"]
    ssim = metrics.ssim_matrix(train_images, snap["x"])
    matched = {c for _, c in metrics.match_by_ssim(ssim)}
    assert sum(ssim[r, c] for r, c in metrics.match_by_ssim(ssim)) / 10 > 0.4  # a reconstruction worth ranking
    unmatched = [j for j in range(20) if j not in matched]
    norms = snap["grad_norms"]
    assert norms[list(matched)].mean() > 1.5 * norms[unmatched].mean()
    assert sum(int(j) in matched for j in snap["ranking"][:10]) >= 7

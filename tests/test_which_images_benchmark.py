"""benchmarks/which_images.py's summary of metrics.py's per_image.csv (its README table), on hand-made rows."""
import csv

import pytest

from tests.helpers import load_benchmark


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["train_index", "label", "ssim", "loss_theta0", "share", "share_cos"])
        w.writeheader()
        w.writerows(rows)


def test_summary_splits_by_part_and_loss_and_bounds_the_average(tmp_path, capsys):
    which = load_benchmark("which_images")
    # two images the change holds (parts 0.5, 0.9), two it hardly does; one unmatched (ssim "")
    rows = [{"train_index": i, "label": i, "ssim": s, "loss_theta0": l, "share": p, "share_cos": 0.1}
            for i, (s, l, p) in enumerate([(0.8, 2.0, 0.9), (0.5, 1.0, 0.5), (0.1, 0.01, 0.05), ("", 0.001, 0.01)])]
    write_csv(tmp_path / "per_image.csv", rows)
    s = which.summary(which.read_rows(str(tmp_path)))
    assert s["avg_ssim"] == pytest.approx(1.4 / 4)
    assert (s["n_visible"], s["n_faint"], s["n_fitted"]) == (2, 2, 2)
    assert s["ssim_visible"] == pytest.approx(0.65) and s["ssim_faint"] == pytest.approx(0.05)
    assert s["spearman_loss"] == pytest.approx(1.0) and s["spearman_share"] == pytest.approx(1.0)
    assert s["ceiling"] == pytest.approx((2 + 0.1) / 4)  # the two held images perfect, the rest as they are
    which.main(which.parse_args([f"run={tmp_path}", "--plot", str(tmp_path / "p.png")]))
    assert "| run | 0.350 | 2, 0.650 |" in capsys.readouterr().out and (tmp_path / "p.png").is_file()


def test_a_csv_without_shares_names_the_flag(tmp_path):
    which = load_benchmark("which_images")
    write_csv(tmp_path / "per_image.csv", [{"train_index": 0, "label": 0, "ssim": 0.5, "loss_theta0": 0.1,
                                            "share": "", "share_cos": ""}])
    with pytest.raises(SystemExit, match="--image_shares"):
        which.read_rows(str(tmp_path))

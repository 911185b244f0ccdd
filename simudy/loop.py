"""The outer loop shared by SimuDy and the baselines: a log.csv row per iteration, snapshots and the
resume state, --resume, a one-line error on a nan loss, the time budget (--max_minutes), and stops by
Ctrl-C or SIGTERM (a SLURM preemption or time limit, or `kill`) that leave a resumable run.
"""
import csv
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .errors import UserError
from .runs import LABELS, LOG, RESUME, prepare_run_dir, snapshot_path

# "l2" is the baselines' squared distance (empty in SimuDy rows, whose match loss goes in "cos").
LOG_FIELDS = ["iteration", "epoch", "step", "total", "cos", "tv", "l2", "lr", "seconds"]
SAVE_EVERY = {"simudy": 100, "baseline": 500}  # snapshot interval in steps (paper code)


@dataclass
class RunState:
    """What a run moves and what --resume restores in place: tensors (x, duals), objects with a
    state_dict (optimisers, schedulers) and the dummies' labels; the columns of its log.csv."""
    tensors: dict
    stateful: dict
    labels: torch.Tensor
    log_fields: list = field(default_factory=lambda: list(LOG_FIELDS))


DEFAULT_NONFINITE_FIX = "lower --rec_lr or --rlr and restart"


class NonFiniteLoss(Exception):
    """An iteration's loss is nan or inf (raised before the dummies move); `fix` is what the error tells."""

    def __init__(self, message, fix=DEFAULT_NONFINITE_FIX):
        super().__init__(message)
        self.fix = fix


def check_finite(value, where, fix=DEFAULT_NONFINITE_FIX):
    if not math.isfinite(value):
        raise NonFiniteLoss(f"the loss became {value} at {where}", fix)
    return value


def save_resume_state(run_dir, state, iteration):
    path = os.path.join(run_dir, RESUME)
    torch.save({**{k: t.detach().cpu() for k, t in state.tensors.items()},
                **{k: o.state_dict() for k, o in state.stateful.items()}, "iteration": iteration}, path + ".tmp")
    os.replace(path + ".tmp", path)


def truncate_log(path, iterations, fields):
    """Keep the log rows of the first `iterations` iterations (rows written after the last resume state)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))[:iterations]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def open_run(run_dir, state, resume, overwrite, device):
    """A fresh run folder (labels.pth, log header), or with `resume` the folder's last resume state and
    labels restored into `state` and the log cut to it. Returns the first iteration to run."""
    log_path = os.path.join(run_dir, LOG)
    if not resume:
        prepare_run_dir(run_dir, overwrite)
        torch.save(state.labels.cpu(), os.path.join(run_dir, LABELS))
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=state.log_fields).writeheader()
        return 0
    resume_path = os.path.join(run_dir, RESUME)
    if not os.path.isfile(resume_path):
        raise UserError(f"nothing to resume in {run_dir} (no resume.pth); start without --resume")
    saved = torch.load(resume_path, map_location="cpu", weights_only=False)
    unfit = f"{resume_path} does not fit these flags; resume with the flags the run was started with"
    if any(k not in saved or saved[k].shape != t.shape for k, t in state.tensors.items()):
        raise UserError(f"{unfit} (its tensors: {sorted(k for k, v in saved.items() if torch.is_tensor(v))})")
    with torch.no_grad():
        for k, t in state.tensors.items():
            t.copy_(saved[k].to(device))
        state.labels.copy_(torch.load(os.path.join(run_dir, LABELS)).to(device))
    try:
        for k, o in state.stateful.items():
            o.load_state_dict(saved[k])
    except (KeyError, ValueError) as err:  # e.g. an optimiser over other tensors (--coarse on one side only)
        raise UserError(f"{unfit} ({err})") from None
    start = saved["iteration"] + 1
    truncate_log(log_path, start, state.log_fields)
    print(f"resuming {run_dir} at iteration {start}")
    return start


class _StopOnSigterm:
    """While active (in the main thread), SIGTERM only sets `received`: the loop finishes the iteration it
    is in, saves, and ends resumably. The previous handler comes back afterwards."""

    def __init__(self, active):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.received = False

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGTERM, self.previous)


def run_iterations(iterate, iterations, log_path=None, save=None, stop_on_nonfinite=False, deadline=None,
                   log_fields=LOG_FIELDS, began=None):
    """The outer loop: iterate(i) computes the loss, moves the dummies and returns the log row; a log.csv
    row per iteration; save(i) writes a snapshot when one is due and returns its path (else None).

    A non-finite loss ends the run with a one-line error naming the last good snapshot, or with
    `stop_on_nonfinite` (short runs) a last row of total nan. Ctrl-C ends a run that saves resumably.
    The loop also ends after the first iteration that finishes past `deadline` (a time.time() value), or
    after the iteration during which a SIGTERM came (runs that save). The log's seconds count from
    `began` (a time.time() value; default: now).
    Returns (last row or None, how it ended: "completed", "deadline", "sigterm" or "interrupted")."""
    log_file = open(log_path, "a", newline="") if log_path else None
    log = csv.DictWriter(log_file, fieldnames=log_fields) if log_file else None
    bar = tqdm(iterations, desc="recons", disable=None)
    started, last_good, row = time.time() if began is None else began, None, None
    try:
        with _StopOnSigterm(save is not None) as sigterm:
            for iteration in bar:
                try:
                    row = {"iteration": iteration, **iterate(iteration)}
                except NonFiniteLoss as err:
                    if stop_on_nonfinite:
                        return {"iteration": iteration, "total": float("nan")}, "completed"
                    raise UserError(f"{err}; the last good snapshot is {last_good or 'none'}; {err.fix}") from None
                row["seconds"] = round(time.time() - started, 3)
                if log:
                    log.writerow(row)
                    log_file.flush()  # before a snapshot's resume state, so the log never lags it
                bar.set_postfix(loss=f"{row['total']:.4f}", refresh=False)
                last_good = (save(iteration) if save else None) or last_good
                if sigterm.received:
                    return row, "sigterm"
                if deadline is not None and time.time() >= deadline:
                    return row, "deadline"
    except KeyboardInterrupt:
        if save is None:  # a short run has nothing to resume from: end the whole search
            raise
        print(f"\ninterrupted; continue with --resume (from {last_good or 'the start'})")
        return row, "interrupted"
    finally:
        if log_file:
            log_file.close()
    return row, "completed"


def run_to_end(run_dir, state, start, total, max_iterations, iterate, save_every, steps_per_epoch,
               write_snapshot, max_minutes=0, began=None):
    """Iterations start .. total, with a snapshot (write_snapshot(i) -> its path) and the resume state every
    `save_every` steps of an outer epoch (0: none) and at the last iteration. A run stopped early by
    --max_iterations, --max_minutes or SIGTERM writes both at its last iteration, so it can be scored and
    resumed. `began` (a time.time() value, default now): when the run began, for the log's seconds and the
    --max_minutes budget (--restarts' short runs count). Returns the last loss (nan if no iteration ran)."""
    end = min(total, max_iterations or total)
    began = time.time() if began is None else began
    deadline = began + 60 * max_minutes if max_minutes else None

    def due(iteration):
        return (save_every and iteration % steps_per_epoch % save_every == 0) or iteration == total - 1

    newest = None  # (iteration, path) of the newest snapshot

    def save(iteration, stopping=False):
        nonlocal newest
        if not (due(iteration) or stopping):
            return None
        newest = (iteration, write_snapshot(iteration))
        save_resume_state(run_dir, state, iteration)
        return newest[1]
    row, ended = run_iterations(iterate, range(start, end), os.path.join(run_dir, LOG), save, deadline=deadline,
                                log_fields=state.log_fields, began=began)
    last = row["iteration"] if row else None
    if ended != "interrupted" and last is not None and last < total - 1:
        path = newest[1] if newest and newest[0] == last else save(last, stopping=True)
        why = "on SIGTERM " if ended == "sigterm" else ""
        print(f"stopped {why}after {last + 1} of {total} iterations (snapshot {path}); continue with --resume")
    return float("nan") if row is None else row["total"]


def main_run_iterations(args):
    """The main run's length in outer iterations: --rec_epochs outer epochs of --rec_steps_per_epoch each."""
    return args.rec_epochs * args.rec_steps_per_epoch


def snapshot_interval(requested, kind):
    """--save_every, or the paper code's interval for SimuDy / the baselines."""
    return SAVE_EVERY[kind] if requested is None else requested


def save_snapshot(run_dir, prefix, x, labels, epoch, step, **extra):
    path = snapshot_path(run_dir, prefix, step)
    torch.save({"x": x.detach().cpu().clone(), "labels": labels.cpu(), "epoch": epoch, "step": step, **extra},
               path)
    return path


def final_loss_text(loss, run_dir):
    return f"final loss {loss:.5f}; run folder {run_dir}"

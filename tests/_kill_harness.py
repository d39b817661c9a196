"""Test helper for test_kill_resume.py (not production code): tiny Trainer runs in child processes, some of them
killed with a real SIGKILL, as a preempted node would be.

Usage: ``python _kill_harness.py JOBS.json``. The harness imports torch, transformers and hf_ema once, then forks one
child per run (a fresh process that never trained; forking spares the seconds an import takes, which matters when a
test kills a dozen runs). ``JOBS.json`` lists jobs, run one after another; each is a dict:

* ``out``: the output_dir; ``prefill``: a folder copied to ``out`` first (a stale earlier run); ``snapshot``: folders
  to copy ``out`` to before the run (what a kill left, for the test to inspect untouched or to resume otherwise);
* ``decay``, ``max_steps``: the run (tiny BERT, exp schedule, a checkpoint every 2 steps, seed 0);
* ``resume``: ``null`` (from scratch), or ``"latest"``: the newest ``checkpoint-N`` holding ``trainer_state.json`` (the
  Trainer's last file), from scratch when there is none; a run whose newest checkpoint is its last step and holds
  its EMA had finished: it is reported ``complete``, with that EMA, and not resumed;
* ``kill_at`` + ``kill_save``: the child kills itself with SIGKILL at that point of its ``kill_save``-th EMA save
  (the points are in ``_install_kill``); ``kill_after``: the harness kills the child after that fraction of the
  wall time of the last job marked ``timing`` (an uninterrupted run);
* ``allow_restart``: ``EMATrainerCallback(allow_ema_restart=...)``;
* ``retry_previous``: when the resume stops with the EMA error, delete that checkpoint and resume from the previous
  one (what the error tells the user to do), in one more child;
* ``result``: where the outcome goes (JSON): for each child, how it ended (``ok`` with the file of its final EMA,
  ``ema_error`` with the message, ``killed``), and the wall time.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import transformers
from _trainer_utils import ToyDataset, training_args
from reference import tiny_bert
from safetensors.torch import save_file
from transformers import Trainer

import hf_ema.io
import hf_ema.state
from hf_ema import EMATrainerCallback
from hf_ema.io import EMA_DIRNAME, STATE_NAME, EMAFileError
from hf_ema.loading import has_ema

SAVE_STEPS = 2
CHILD_TIMEOUT = 120.0  # seconds; a child still running then is killed and reported as hung

# No progress bars: tqdm guards them with a lock shared by forked processes, which a child killed while holding it
# would leave locked for every later child.
transformers.utils.logging.disable_progress_bar()


def _finished(checkpoint: Path) -> bool:
    """Whether the Trainer finished writing ``checkpoint`` (its last file, trainer_state.json, is whole)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(out: Path) -> Path | None:
    found = [
        (int(m.group(1)), p)
        for p in out.glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and _finished(p)
    ]
    return max(found)[1] if found else None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(point: str, at_save: int) -> None:
    """Make this process SIGKILL itself at ``point`` of its ``at_save``-th EMA save, by wrapping what
    ``hf_ema.io.save_ema_net`` calls (the library itself is not changed)."""
    import safetensors.torch

    active = {"on": False, "n": 0}
    real_save, real_save_file = hf_ema.state.save_ema_net, safetensors.torch.save_file
    real_atomic, real_replace, real_rmtree = hf_ema.io.atomic_write_text, os.replace, shutil.rmtree

    def save_ema_net(*args, **kwargs):
        active["n"] += 1
        active["on"] = active["n"] == at_save
        if active["on"] and point == "save_start":
            _die()  # the Trainer's checkpoint is written, the EMA save not begun
        out = real_save(*args, **kwargs)
        if active["on"] and point == "save_end":
            _die()
        active["on"] = False
        return out

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        if active["on"] and point == "weights_partial":  # half the weights file on disk
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
            _die()
        if active["on"] and point == "weights_written":
            _die()

    def atomic_write_text(path, text):
        real_atomic(path, text)
        if active["on"] and point == "json_written" and Path(path).name == STATE_NAME:  # before the renames
            _die()

    def replace(src, dst, *args, **kwargs):
        if active["on"] and point == "json_unrenamed" and Path(dst).name == STATE_NAME:
            _die()  # the JSON is complete in its temporary file, not yet under its name
        real_replace(src, dst, *args, **kwargs)
        if active["on"] and point == "between_renames" and Path(src).name == EMA_DIRNAME:
            _die()  # the previous ema_net moved aside, the new one not yet in place
        if active["on"] and point == "renamed" and Path(dst).name == EMA_DIRNAME:
            _die()

    def rmtree(path, *args, **kwargs):
        if active["on"] and point == "cleanup" and Path(path).name.startswith(f".{EMA_DIRNAME}.old-"):
            _die()  # the new ema_net in place, the previous one not yet deleted
        real_rmtree(path, *args, **kwargs)

    hf_ema.state.save_ema_net = save_ema_net
    safetensors.torch.save_file = save_file
    hf_ema.io.atomic_write_text = atomic_write_text
    os.replace = replace
    shutil.rmtree = rmtree


def _train(job: dict, resume: str | None, ema_file: str) -> None:
    """One training run (in the child). Writes the final EMA to ``ema_file``."""
    torch.set_num_threads(1)
    if job.get("kill_at"):
        _install_kill(job["kill_at"], job.get("kill_save", 2))
    model = tiny_bert(seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cb = EMATrainerCallback(
        decay=job["decay"], decay_type="exp", beta=4.0, allow_ema_restart=job.get("allow_restart", False)
    )
    args = training_args(
        job["out"],
        max_steps=job["max_steps"],
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=100,
        learning_rate=0.3,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset(64, tokens=True), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    save_file({k: v.clone() for k, v in cb.ema.ema_state_dict().items()}, ema_file)


def _child(job: dict, resume: str | None, ema_file: str, status_file: str) -> None:
    code = 0
    try:
        _train(job, resume, ema_file)
        status = {"status": "ok"}
    except EMAFileError as e:
        status = {"status": "ema_error", "error": str(e)}
    except BaseException:  # reported to the test, which fails on it
        status = {"status": "crash", "error": traceback.format_exc()}
        code = 1
    Path(status_file).write_text(json.dumps(status))
    os._exit(code)


def run_child(job: dict, resume: str | None, tag: str, reference_wall: float) -> dict:
    base = Path(job["result"]).with_suffix("")
    ema_file, status_file = f"{base}.{tag}.ema.safetensors", f"{base}.{tag}.status.json"
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, resume, ema_file, status_file)
    kill_at = (
        start + job["kill_after"] * reference_wall
        if job.get("kill_after") is not None and tag == "run"
        else None
    )
    done, wait_status, hung = 0, 0, False
    while not done:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        now = time.monotonic()
        if not done and ((kill_at is not None and now >= kill_at) or now - start > CHILD_TIMEOUT):
            hung = kill_at is None or now < kill_at
            os.kill(pid, signal.SIGKILL)
            _, wait_status = os.waitpid(pid, 0)
            break
        time.sleep(0.002 if kill_at is not None else 0.02)
    out = {"resume": resume, "wall": time.monotonic() - start}
    if hung:
        out.update(status="hung", error=f"still running after {CHILD_TIMEOUT} s")
    elif os.WIFSIGNALED(wait_status):
        out.update(status="killed", signal=os.WTERMSIG(wait_status))
    elif Path(status_file).is_file():
        out.update(json.loads(Path(status_file).read_text()))
    else:
        out.update(status="crash", error=f"child exited {wait_status} without a status")
    if out.get("status") == "ok":
        out["ema_file"] = ema_file
    return out


def run_job(job: dict, reference_wall: float) -> dict:
    out = Path(job["out"])
    if job.get("prefill"):
        shutil.copytree(job["prefill"], out, dirs_exist_ok=True)
    for copy in job.get("snapshot", ()):
        if out.is_dir():
            shutil.copytree(out, copy)
        else:  # a run killed before the Trainer made its output_dir left nothing
            os.makedirs(copy)
    resume = job.get("resume")
    if resume == "latest":
        found = latest_checkpoint(out)
        resume = str(found) if found else None
        if found and int(found.name.split("-")[1]) >= job["max_steps"] and has_ema(found):
            # The run had finished (has_ema finishes an interrupted EMA save, as a resume would). Not resumed: this
            # Trainer (5.24) resumed at max_steps trains one step more.
            ema_file = str(found / EMA_DIRNAME / "model.safetensors")
            return {"job": job, "runs": [{"resume": resume, "status": "complete", "ema_file": ema_file}]}
    runs = [run_child(job, resume, "run", reference_wall)]
    if job.get("retry_previous") and runs[-1]["status"] == "ema_error" and resume:
        shutil.rmtree(resume)
        found = latest_checkpoint(out)
        runs.append(run_child(job, str(found) if found else None, "retry", reference_wall))
    return {"job": job, "runs": runs}


def _warm_up(folder: Path) -> None:
    """One short run here, before any fork, so that what a first run loads lazily is loaded once: the children's
    runs then take the same time from the start, and the random kill moments spread over the whole run."""
    _train(
        {"out": str(folder / "warm_up"), "decay": 0.5, "max_steps": SAVE_STEPS},
        None,
        str(folder / "warm_up.st"),
    )
    shutil.rmtree(folder / "warm_up")
    os.unlink(folder / "warm_up.st")
    import tqdm.std

    assert not hasattr(tqdm.std.TqdmDefaultWriteLock, "mp_lock"), "a lock the children would share"
    gc.collect()
    gc.freeze()  # the children's gc.collect() (Accelerate calls it) then skips all that


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    _warm_up(Path(sys.argv[1]).parent)
    reference_wall = 0.0
    for job in jobs:
        result = run_job(job, reference_wall)
        if job.get("timing"):
            reference_wall = result["runs"][0]["wall"]
        Path(job["result"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

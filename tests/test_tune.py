"""mslora tune: grids, the choice on validation, intervals, and a tune killed mid-trial that resumes without
re-running its finished trials."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import colour_folder
from mslora.cli import main
from mslora.tools.tune import parse_grid, points, summarise, t_interval, variant

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--backbone", "test_resnet", "--no-pretrained", "--batch-size", "4", "--img-size", "32", "--warmup-epochs", "0"]


def test_grids_parse_and_multiply():
    assert parse_grid(["lr=1e-3,3e-3", "weight_decay=0,0.05"]) == {"lr": [1e-3, 3e-3], "weight_decay": [0, 0.05]}
    assert parse_grid(["mslora.rank=32,128", "lora.rank=8"], prefix_method=True) == {"mslora": {"rank": [32, 128]},
                                                                                   "lora": {"rank": [8]}}
    assert points({"lr": [1, 2], "wd": [0, 5]}) == [{"lr": 1, "wd": 0}, {"lr": 1, "wd": 5}, {"lr": 2, "wd": 0},
                                                    {"lr": 2, "wd": 5}]
    for bad, match in ((["lr"], "is not KEY=V1,V2"), (["lr="], "is not KEY=V1,V2"), (["lr=1", "lr=2"], "twice")):
        with pytest.raises(ValueError, match=match):
            parse_grid(bad)
    assert variant("mslora@rank=128@groups=2") == ("mslora", {"rank": 128, "groups": 2}) and variant("lora") == ("lora", {})
    with pytest.raises(ValueError, match="is not METHOD.OPTION"):
        parse_grid(["rank=8"], prefix_method=True)
    with pytest.raises(ValueError, match="unknown method 'nosuch'"):
        parse_grid(["nosuch.rank=8"], prefix_method=True)


def test_t_interval_and_the_paired_comparison():
    lo, hi = t_interval([1.0, 2.0, 3.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / 3 ** 0.5  # sample std 1, n = 3
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    run = lambda seed, top1, **kw: {"task": "classify", "seed": seed, "test_top1": top1, "trainable_params": 10,  # noqa: E731
                                    "seconds_train": 1.0, **kw}
    rows = summarise({
        "a": {"chosen": {"lr": 0.1}, "final": [run(0, 0.90), run(1, 0.91), run(2, 0.92)], "search": []},
        "b": {"chosen": {"lr": 0.1}, "final": [run(0, 0.80), run(1, 0.81), run(2, 0.80)], "search": []},
        "c": {"chosen": {"lr": 0.1}, "final": [run(0, 0.89), run(1, 0.93), run(2, 0.5, collapsed=True,
                                                                                 collapse_reason="at chance")],
              "search": [{"point": {"lr": 1.0}, "collapsed": True}]},
    })
    a, b, c = rows
    assert a["best"] and a["mean"] == pytest.approx(91.0)
    assert b["distinguishable"] is True and b["paired_diff"] == pytest.approx(-10.67, abs=0.01)
    assert c["seeds"] == [0, 1] and c["distinguishable"] is False  # its wide interval overlaps a's
    assert c["collapsed"] == ["seed 2: at chance"] and c["search_collapsed"] == ["lr=1.0"]  # left out, listed


def test_errors_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "tune"
    for argv, match in (
        (["--methods", "lora", "--method-grid", "mslora.rank=4"], "names mslora, not among --methods lora"),
        (["--methods", "mslora", "--grid", "lr=abc"], "lr='abc' must be of type float"),
        (["--methods", "mslora", "--method-grid", "mslora.rnak=4"], "rnak"),
        (["--methods", "mslora", "--seeds", "0,x"], "--seeds 0,x is not"),
        (["--methods", "mslora@rank=0"], "rank"),
        (["--methods", "linear", "--seed", "3"], "--seed is set per run here; use --seeds"),
        (["--methods", "linear", "--method=lora"], "--method is set per run here; use --methods"),
        (["--methods", "linear", "--tasks", "dtd"], "--tasks dtd needs --vtab-root"),
        (["--methods", "linear"], "holds no images"),  # the data is loaded before the output exists
    ):
        assert main(["tune", *argv, "--output", str(out), *TINY, "--data", str(tmp_path)]) == 2
        assert match in capsys.readouterr().err
        assert not out.exists()
    data = colour_folder(tmp_path / "data", ("red", "green"), 6)
    assert main(["tune", "--methods", "linear", "--report", "--output", str(out), *TINY, "--data", str(data)]) == 2
    assert "holds no trials" in capsys.readouterr().err and not out.exists()


def _trial_runs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "trials").glob("*/*/*/*/*/*") if (p / "config.yaml").is_file())


def test_a_killed_tune_resumes_without_re_running_finished_trials(tmp_path):
    data = colour_folder(tmp_path / "data", ("red", "green", "blue"), 10)
    out = tmp_path / "tune"
    kwargs = dict(train_argv=[*TINY, "--data", str(data), "--epochs", "12", "--set", "ckpt_every=1"],
                  methods=["linear"], grid={"lr": [0.01, 0.03]}, method_grid={}, seeds=[0, 1], output=str(out))
    code = ("import sys, mslora.tools.tune as t; t.HEARTBEAT_S, t.GRACE_S = 1, 2; "
            f"t.tune(**{kwargs!r})")
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:  # kill it once one trial has finished and another has a checkpoint but no result
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            runs = _trial_runs(out)
            finished = [r for r in runs if (r / "metrics.json").is_file()]
            midway = [r for r in runs if (r / "checkpoints" / "last.pt").is_file() and not (r / "metrics.json").exists()]
            if finished and midway:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the tune ended before it could be killed mid-trial"
    before = {r: (r / "metrics.json").stat().st_mtime_ns for r in finished}
    import mslora.tools.tune as t

    # --report on the stopped tune: trains nothing, chooses nothing from a partial search, says how far it got
    now = _trial_runs(out)
    t.tune(report_only=True, **kwargs)
    assert _trial_runs(out) == now
    row = json.loads((out / "report.json").read_text())["summary"]["data"][0]
    done = [r for r in now if (r / "metrics.json").is_file()]
    searched, finals = (sum(f"/{stage}/" in str(r) for r in done) for stage in ("search", "final"))
    assert row["finished"] == f"{searched}/2 search, {finals}/2 final"
    if searched < 2:  # the usual case: killed in the search's second trial
        assert row["chosen"] is None and row["mean"] is None
        assert "| linear | - | - | - | - | - |" in (out / "report.md").read_text()
    time.sleep(2.5)  # the killed worker's heartbeat lapses (grace 2 s here)
    t.HEARTBEAT_S, t.GRACE_S = 1, 2
    try:
        report = t.tune(**kwargs)
    finally:
        t.HEARTBEAT_S, t.GRACE_S = 30, 90
    for r, mtime in before.items():
        assert (r / "metrics.json").stat().st_mtime_ns == mtime, f"{r} was trained again"
    runs = _trial_runs(out)
    assert len(runs) == 4 and all((r / "metrics.json").is_file() for r in runs)  # 2 search + 2 final, no duplicate
    for r in midway:  # the killed trial went on in its own directory, from its checkpoint
        assert "resumed from" in (r / "train.log").read_text()
    chosen = json.loads((out / "report.json").read_text())["summary"]["data"][0]["chosen"]
    final0 = json.loads(next((out / "trials/data/linear/final").glob("*/seed0/*/metrics.json")).read_text())
    searched = next((out / "trials/data/linear/search").glob(f"lr={chosen['lr']}/seed0/*/metrics.json")).parent
    assert final0["tested_from"] == str(searched) and "test_top1" in final0  # seed 0 not trained twice
    assert "test_top1" not in json.loads((searched / "metrics.json").read_text())  # the search never saw test
    data = json.loads((out / "report.json").read_text())
    assert [row["method"] for row in data["summary"]["data"]] == ["linear"]
    assert report.read_text().count("| linear |") == 1 and (out / "metric_vs_params.png").is_file()


def test_a_trial_another_live_worker_holds_is_left_to_it(tmp_path):
    # a worker whose heartbeat lapsed (paused, preempted) but still trains: its run's lock says so, and the
    # trial is not resumed a second time beside it
    from mslora.tools.tune import Tune

    data = colour_folder(tmp_path / "data", ("red", "green"), 6)
    job = Tune([*TINY, "--data", str(data), "--epochs", "1"], ["linear"], {"lr": [0.01]}, {}, [0], tmp_path / "t")
    run = job.trial_dir("data", "linear", {"lr": 0.01}, 0, "search") / "linear-run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: linear\n")
    holder = subprocess.Popen([sys.executable, "-c", "import time; from filelock import FileLock; "
                               f"lock = FileLock({str(run / '.lock')!r}); lock.acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert job.run_trial("data", "linear", {"lr": 0.01}, 0, "search") == {"busy": str(run), "run": str(run)}
    finally:
        holder.kill()
    assert not (run / "metrics.json").exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage", "ignore::optuna.exceptions.ExperimentalWarning")
def test_a_worker_takes_a_dead_workers_trial_and_moves_on_from_a_live_ones(tmp_path, monkeypatch):
    # a tune started again after a kill: linear's two search trials are RUNNING in the study, one of a worker still
    # alive (its heartbeat beats), one of a dead worker. This worker trains the dead one's point (Optuna queued it
    # again) and bitfit meanwhile, rather than wait on linear; once the live holder dies too, it finishes the tune.
    import threading

    import optuna

    import mslora.tools.tune as t

    monkeypatch.setattr(t, "HEARTBEAT_S", 1)
    monkeypatch.setattr(t, "GRACE_S", 2)
    data = colour_folder(tmp_path / "data", ("red", "green"), 6)
    grid = {"lr": [0.01, 0.03]}
    job = t.Tune([*TINY, "--data", str(data), "--epochs", "1"], ["linear", "bitfit"], grid, {}, [0], tmp_path / "t")
    job.out.mkdir(parents=True)
    storage = optuna.storages.RDBStorage(job.storage, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="data/linear/search", storage=storage, direction="maximize",
                                sampler=optuna.samplers.GridSampler(grid, seed=0))
    live, dead = study.ask(), study.ask()  # RUNNING, as the killed tune's workers left them
    lrs = [trial.suggest_categorical("lr", grid["lr"]) for trial in (live, dead)]
    storage.record_heartbeat(dead._trial_id)  # its last beat: stale after the grace period
    alive = threading.Event()
    alive.set()

    def beat():
        while alive.is_set():
            storage.record_heartbeat(live._trial_id)
            time.sleep(0.2)

    threading.Thread(target=beat, daemon=True).start()
    worker = threading.Thread(target=job.run, daemon=True)
    worker.start()

    def done(method, lr, stage="search"):
        return job.result("data", method, {"lr": lr}, 0, stage) is not None

    deadline = time.time() + 120
    while time.time() < deadline and not (done("linear", lrs[1]) and all(done("bitfit", lr) for lr in lrs)):
        time.sleep(0.1)
    assert done("linear", lrs[1]), "the dead worker's trial was not taken"
    assert all(done("bitfit", lr) for lr in lrs), "the worker waited on linear instead of moving on"
    assert not done("linear", lrs[0]) and worker.is_alive()  # left to its live holder
    alive.clear()  # the holder dies: after the grace period its trial is this worker's
    worker.join(120)
    assert not worker.is_alive()
    assert all(done("linear", lr) for lr in lrs) and (job.out / "report.md").is_file()
    runs = list((job.out / "trials").glob("data/*/search/*/seed0/*/metrics.json"))
    assert len(runs) == 4  # each point trained once


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_worker_judged_dead_while_paused_keeps_its_run_and_goes_on(tmp_path):
    # a worker paused past the grace period (SIGSTOP, a preempted node) is judged dead by another, which fails its
    # trial; once it wakes and finishes the run, Optuna refuses to record the result: the tune goes on regardless
    import optuna

    import mslora.tools.tune as t

    data = colour_folder(tmp_path / "data", ("red", "green"), 6)
    job = t.Tune([*TINY, "--data", str(data), "--epochs", "1"], ["linear"], {"lr": [0.01, 0.03]}, {}, [0],
                 tmp_path / "t")
    train = job.run_trial

    def judged_dead_meanwhile(*args):
        r = train(*args)
        storage = optuna.storages.RDBStorage(job.storage)
        study = optuna.load_study(study_name="data/linear/search", storage=storage)
        for trial in study.get_trials(states=[optuna.trial.TrialState.RUNNING]):
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return r

    job.run_trial = judged_dead_meanwhile
    report = job.run()
    assert report.is_file()
    runs = list((job.out / "trials").glob("data/linear/search/*/seed0/*/metrics.json"))
    assert len(runs) == 2  # each point trained once, neither lost


def test_local_workers_start_on_a_storage_that_exists(tmp_path, monkeypatch):
    # N workers that each create a fresh SQLite storage at the same moment race in its schema's set-up (one dies on
    # alembic_version's UNIQUE constraint): the parent creates it before it starts them
    import sqlite3

    import mslora.tools.tune as t

    seen = []

    class Worker:  # records what the storage holds when a worker would start
        exitcode = 0

        def __init__(self, target, args):
            pass

        def start(self):
            with sqlite3.connect(tmp_path / "t" / "optuna.db") as db:
                seen.append(db.execute("select count(*) from alembic_version").fetchone()[0])

        def join(self):
            pass

    class Context:
        Process = Worker

    monkeypatch.setattr(t.multiprocessing, "get_context", lambda method: Context)
    data = colour_folder(tmp_path / "data", ("red", "green"), 6)
    t.tune(workers=2, train_argv=[*TINY, "--data", str(data), "--epochs", "1"], methods=["linear"],
           grid={"lr": [0.01]}, method_grid={}, seeds=[0], output=str(tmp_path / "t"))
    assert seen == [1, 1]


def _open_storage(url, start, results):
    from mslora.tools.tune import Tune

    job = Tune.__new__(Tune)  # only what opening the storage needs
    job.storage = url
    while time.time() < start:  # all at the same moment
        pass
    try:
        import optuna

        optuna.create_study(study_name="s", storage=job.rdb, load_if_exists=True)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which asserts on it
        results.put(f"{type(e).__name__}: {str(e).splitlines()[0]}")


def test_workers_on_several_machines_meeting_a_fresh_database_all_open_it(tmp_path):
    # workers that each open a fresh database at the same moment (several machines on one --storage URL, where no
    # parent can create it first) race in Optuna's schema set-up; before the retry, 10 of 20 such openings failed
    # ("table ... already exists", alembic_version's UNIQUE constraint). Real processes, a real race.
    import multiprocessing

    import mslora.tools.tune  # noqa: F401 - imported before forking, so the workers start at once

    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(3):
        results, start = ctx.Queue(), time.time() + 1.0
        procs = [ctx.Process(target=_open_storage, args=(f"sqlite:///{tmp_path / f'{round_}.db'}", start, results))
                 for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=5) for _ in procs]
    assert outcomes == ["ok"] * 12


def test_a_dense_task_tunes_on_its_own_metric(tmp_path):
    """`mslora tune --task segment`: the choice is made on validation mIoU, the report's numbers are test mIoU in %."""
    from mslora.data.scenes import write_scenes

    g = np.zeros((12, 28, 28), np.uint8)
    g[0::2, 4:24, 4:24] = 220  # squares
    g[1::2, 2:26, 10:18] = 220  # bars
    labels = np.arange(12) % 2
    data = write_scenes(tmp_path / "scenes", g, labels, g, labels, ["square", "bar"], {"train": 6, "val": 3, "test": 3})
    out = tmp_path / "tune"
    argv = ["tune", "--task", "segment", "--methods", "fixed,mslora@rank=4@groups=1", "--grid", "lr=1e-3,1e-2",
            "--seeds", "0,1", "--output", str(out), "--backbone", "test_resnet", "--no-pretrained", "--batch-size", "2",
            "--img-size", "64", "--epochs", "1", "--warmup-epochs", "0", "--head-channels", "8", "--data", str(data)]
    assert main(argv) == 0
    rows = json.loads((out / "report.json").read_text())["summary"]
    (task, rows), = rows.items()
    for row in rows:
        method = row["method"]
        search = {p.parts[-4]: json.loads(p.read_text())["val_mIoU"]
                  for p in (out / "trials" / task / method / "search").glob("*/seed0/*/metrics.json")}
        assert len(search) == 2 and row["metric"] == "mIoU" and row["finished"] == "2/2 search, 2/2 final"
        best = max(search.values())  # ties go to the smaller lr
        assert row["chosen"]["lr"] == min(float(k[3:]) for k, v in search.items() if v == best)
        finals = [json.loads(p.read_text())
                  for p in (out / "trials" / task / method / "final").glob("*/seed*/*/metrics.json")]
        assert sorted(row["test"]) == ["0", "1"]  # JSON keys
        assert sorted(100 * f["test_mIoU"] for f in finals) == pytest.approx(sorted(row["test"].values()))
        assert 0 <= row["mean"] <= 100

"""``mslora tune``: every method tuned on validation, then re-run with several seeds, and one report with intervals.

The protocol of Mai et al. ("Lessons Learned from a Unifying Empirical Study of Parameter-Efficient Transfer
Learning in Visual Recognition", arXiv 2409.16434, ``main_tune.py``): per task and per method, every point of a
grid (``--grid lr=... --grid weight_decay=...``, and per-method options ``--method-grid mslora.rank=32,128``) trains
on train and is scored on validation (the test split is never evaluated in this stage: ``test=False``); the best
point (ties: the smaller lr, then the earlier point) is re-run with every seed, and only those runs' test metrics are
reported (the search's own seed is not trained twice: its search run's best adapter is evaluated on test, which is
what a re-run of the same config would report). A method may appear several times with fixed options (``--methods mslora,mslora@rank=128``), each its
own row. VTAB-1k (``--vtab-root``, the task folders ``mslora sweep`` knows): ``--vtab-protocol`` chooses on
``train800`` (validated on ``val200``) and trains the final runs on ``train800val200``, the papers' protocol.

Trials run on Optuna (a study per task and method: ``GridSampler`` over the grid, then over the seeds) with a
shared storage: an SQLite file ``OUTPUT/optuna.db`` by default, which several local worker processes (``--processes N``) share,
or ``--storage URL`` (PostgreSQL, MySQL) that workers on several machines attach to by running the same command.
Optuna rather than Ray Tune: a trial here is one ordinary ``mslora`` run (which already places itself on a device
and resumes from its own checkpoint), so all the engine must do is hand out grid points and notice dead workers,
which Optuna's RDB storage does with a heartbeat; Ray would add a cluster runtime (and a few hundred MB) for that.
Each trial is a run directory ``OUTPUT/trials/TASK/METHOD/STAGE/POINT/seedS/<run>``: a tune that is killed and
started again reads finished trials (``metrics.json``) instead of training them, resumes a trial killed mid-way from
its checkpoint (:func:`mslora.engine.loop.resume`), and hands the trials of a dead worker out again once its
heartbeat is older than the grace period. A worker whose method has only trials that live workers hold goes on to
the next method's trials instead of waiting (with one seed left to run, a final stage would otherwise keep all but
one worker idle).

``report.md`` / ``report.json``: per task and method the chosen point, the test metric's mean, sample std and 95%
interval over the seeds (Student's t with n - 1 degrees of freedom), trainable parameters, training seconds, and a
paired comparison with the best method over the seeds both ran (mean difference and its t interval); a method whose
interval overlaps the best one's is marked as not distinguishable from it. Collapsed runs are listed and left out.
``metric_vs_params.png`` plots the means with their intervals against trainable parameters.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

from mslora.engine.checkpoint import atomic_write
from mslora.engine.config import config_from_args, pop_sets
from mslora.engine.loop import TrainingDiverged, resume, train
from mslora.registry import get_method, get_task
from mslora.tools.sweep import task_folders

log = logging.getLogger("mslora")
HEARTBEAT_S = 30  # Optuna's heartbeat; a RUNNING trial silent for GRACE_S is a dead worker's, handed out again
GRACE_S = 90  # (so a tune started again right after a kill picks the killed trial up after at most this long)
SCHEMA_TRIES = 5  # attempts at opening the storage while other workers create its schema


def parse_grid(items: list[str], prefix_method: bool = False) -> dict:
    """``KEY=V1,V2,...`` pairs (values read as YAML, ``2e-3`` as a float) into ``{KEY: [values]}``; with
    ``prefix_method`` the keys are ``METHOD.OPTION`` and the result is ``{METHOD: {OPTION: [values]}}``.

    Raises:
        ValueError: a pair without ``=`` or without values, a key given twice, or (prefix_method) a key without a
            method, naming one that does not exist.
    """
    out: dict = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip().replace("-", "_")
        parts = [v for v in values.split(",") if v.strip()]
        if not eq or not key or not parts:
            raise ValueError(f"grid '{item}' is not KEY=V1,V2,... (e.g. lr=1e-3,3e-3,1e-2)")
        parsed = [pop_sets(["--set", f"{key}={v.strip()}"])[1][key] for v in parts]
        where = out
        if prefix_method:
            method, dot, key = key.partition(".")
            if not dot or not key:
                raise ValueError(f"method grid '{item}' is not METHOD.OPTION=V1,V2,... (e.g. mslora.rank=32,128)")
            get_method(method)  # an unknown method: ValueError naming the known ones
            where = out.setdefault(method, {})
        if key in where:
            raise ValueError(f"grid key '{key}' is given twice")
        where[key] = parsed
    return out


def variant(label: str) -> tuple[str, dict[str, Any]]:
    """A ``--methods`` entry: a method, or a method with fixed options, ``METHOD@KEY=VALUE[@KEY=VALUE...]`` (e.g.
    ``mslora@rank=128``, reported as its own row). Returns (method, options).

    Raises:
        ValueError: an unknown method, or an option that is not KEY=VALUE.
    """
    method, *fixed = label.split("@")
    get_method(method)
    options = {}
    for item in fixed:
        options.update(pop_sets(["--set", item])[1])
    return method, options


def points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every point of the grid (the product of its values, in the order given)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    """A folder name for a grid point, e.g. ``lr=0.001,weight_decay=0``."""
    return ",".join(f"{k}={v}" for k, v in point.items()) or "default"


class Tune:
    """One tune: the base training arguments, the methods and grids, the seeds and the output folder (see module
    doc). Every trial's configuration is built (and so checked) on construction, before anything is written.

    Raises:
        ValueError / FileNotFoundError: an unknown method, option or grid key, a value a method refuses, an empty
            grid or seed list, VTAB-1k task folders that are missing.
    """

    def __init__(self, train_argv: list[str], methods: list[str], grid: dict[str, list],
                 method_grid: dict[str, dict[str, list]], seeds: list[int], output: str | Path,
                 vtab_root: str | Path | None = None, tasks: list[str] | None = None, vtab_protocol: bool = False,
                 storage: str | None = None) -> None:
        if not methods:
            raise ValueError("no methods given (--methods m1,m2,...)")
        if not seeds:
            raise ValueError("no seeds given (--seeds 0,1,2)")
        self.variants = {m: variant(m) for m in methods}
        unknown = sorted(set(method_grid) - {base for base, _ in self.variants.values()})
        if unknown:
            raise ValueError(f"--method-grid names {', '.join(unknown)}, not among --methods {', '.join(methods)}")
        self.argv, self.methods, self.seeds = list(train_argv), list(methods), list(seeds)
        self.out = Path(output)
        self.storage = storage or f"sqlite:///{(self.out / 'optuna.db').resolve()}"
        self.grids = {m: {**grid, **method_grid.get(self.variants[m][0], {})} for m in methods}
        self.vtab_protocol = vtab_protocol
        if vtab_root is not None:
            root = Path(vtab_root)
            self.tasks = {t: ["--data", str(root / t)] for t in task_folders(root, tasks)}
        else:
            self.tasks = {"data": []}
        for task in self.tasks:  # every configuration checked, and each task's data loaded, before anything is written
            for method in methods:
                for p in points(self.grids[method]):
                    cfg = self.config(task, method, p, self.seeds[0], "search")
                    get_method(cfg.method).make_config(**cfg.method_options)
                final = self.config(task, method, points(self.grids[method])[0], self.seeds[0], "final")
            for c in {cfg.split: cfg, final.split: final}.values():  # the search's split and the final runs'
                get_task(c.task)(c)

    def config(self, task: str, method: str, point: dict[str, Any], seed: int, stage: str):
        """The TrainConfig of one trial (its ``output`` the trial's folder, ``test`` off in the search stage)."""
        base, fixed = self.variants[method]
        sets = [a for k, v in {**fixed, **point}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        split = []
        if self.vtab_protocol:
            split = ["--set", "split=" + ("train800" if stage == "search" else "train800val200")]
        cfg = config_from_args([*self.argv, *self.tasks[task], "--method", base, "--seed", str(seed), *split, *sets,
                                "--output", str(self.trial_dir(task, method, point, seed, stage))])
        cfg.test = stage == "final"
        return cfg

    def trial_dir(self, task: str, method: str, point: dict[str, Any], seed: int, stage: str) -> Path:
        """``OUTPUT/trials/TASK/METHOD/STAGE/POINT/seedS``: the parent of the trial's one run directory."""
        return self.out / "trials" / task / method / stage / point_name(point) / f"seed{seed}"

    def result(self, task: str, method: str, point: dict[str, Any], seed: int, stage: str) -> dict[str, Any] | None:
        """A finished trial's metrics (with ``run``), or None when it has not finished."""
        parent = self.trial_dir(task, method, point, seed, stage)
        for run in sorted(parent.iterdir()) if parent.is_dir() else []:
            if (run / "metrics.json").is_file():
                return {**json.loads((run / "metrics.json").read_text()), "run": str(run)}
        return None

    def run_trial(self, task: str, method: str, point: dict[str, Any], seed: int, stage: str) -> dict[str, Any]:
        """Finish one trial: read it when finished, resume it when started (its checkpoint), else train it.
        A diverged run (:class:`TrainingDiverged`) is recorded as collapsed, not raised."""
        done = self.result(task, method, point, seed, stage)
        if done is not None:
            log.info("%s %s %s %s seed %d: finished before, read", task, method, stage, point_name(point), seed)
            return done
        parent = self.trial_dir(task, method, point, seed, stage)
        if stage == "final" and seed == self.seeds[0] and not self.vtab_protocol:
            searched = self.result(task, method, point, seed, "search")
            if searched is not None and not searched.get("collapsed"):
                return tested(searched, parent)
        started = [r for r in sorted(parent.iterdir()) if (r / "config.yaml").is_file()] if parent.is_dir() else []
        if started and in_use(started[0]):  # a worker alive but late with its heartbeat (paused, preempted) has it
            return {"busy": str(started[0]), "run": str(started[0])}
        try:
            metrics, run = resume(started[0]) if started else train(self.config(task, method, point, seed, stage))
        except TrainingDiverged as e:
            run = started[0] if started else max(parent.iterdir(), key=lambda r: r.stat().st_mtime)
            metrics = {"collapsed": True, "collapse_reason": f"diverged: {e}", "method": method, "seed": seed}
            (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return {**metrics, "run": str(run)}

    def choose(self, task: str, method: str) -> dict[str, Any] | None:
        """The search stage's best point: the highest validation metric among its runs that did not collapse;
        ties go to the smaller lr, then to the earlier point. None while the search has not finished (a point is
        never chosen from part of it) and when every point collapsed."""
        best = None
        for i, p in enumerate(points(self.grids[method])):
            r = self.result(task, method, p, self.seeds[0], "search")
            if r is None:
                return None
            if r.get("collapsed"):
                continue
            key = (r[f"val_{get_task(r['task']).best_metric}"], -float(p.get("lr", r.get("lr", 0))), -i)
            if best is None or key > best[0]:
                best = (key, p)
        return None if best is None else best[1]

    @functools.cached_property
    def rdb(self):
        """The Optuna storage at ``self.storage`` (its schema created on first use), with the heartbeat that notices
        dead workers and re-queues their trials; made once per worker, not at every stage of every pass."""
        import warnings

        import optuna

        import sqlalchemy

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # mslora's own log names each trial
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retries
        for attempt in range(SCHEMA_TRIES):
            try:
                return optuna.storages.RDBStorage(
                    self.storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None))
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
                # workers (on several machines) that meet a fresh database at the same moment race in Optuna's
                # schema set-up ("table ... already exists", alembic_version's UNIQUE constraint): the schema is
                # there once the winner is done, so try again (a database that is down keeps failing: raised)
                if attempt == SCHEMA_TRIES - 1:
                    raise
                time.sleep(1 + attempt)

    def _stage(self, task: str, method: str, stage: str, grid: dict[str, list], run) -> bool:
        """Run the points of ``grid`` as trials of one Optuna study (GridSampler) that no live worker holds; True once
        every point has finished (here or on another worker), False when the points left are all held by live
        workers (the caller moves on to other work instead of waiting). A dead worker's trials are handed out again
        after the heartbeat's grace period."""
        import optuna

        study = optuna.create_study(study_name=f"{task}/{method}/{stage}", storage=self.rdb, load_if_exists=True,
                                    sampler=optuna.samplers.GridSampler(grid, seed=0), direction="maximize")

        def objective(trial) -> float:
            point = {k: trial.suggest_categorical(k, v) for k, v in grid.items()}
            r = run(point)
            trial.set_user_attr("run", r["run"])
            if "busy" in r:
                time.sleep(HEARTBEAT_S)
                raise optuna.TrialPruned(f"{r['busy']} is being trained by another worker")
            if r.get("collapsed"):
                raise optuna.TrialPruned(r.get("collapse_reason") or "collapsed")
            return float(r.get(f"val_{get_task(r['task']).best_metric}", math.nan))

        def key(params: dict[str, Any]) -> str:
            return json.dumps(params, sort_keys=True)

        while True:
            todo = [p for p in points(grid) if self.result_of(task, method, stage, p) is None]
            if not todo:
                return True
            optuna.storages.fail_stale_trials(study)  # a dead worker's trials: failed, and queued again (retry)
            trials = study.get_trials(deepcopy=False)
            state = optuna.trial.TrialState
            held = {key(t.params) for t in trials if t.state == state.RUNNING}
            left = [p for p in todo if key(p) not in held]
            if not left:
                return False  # live workers hold every point left
            queued = {key(t.params or t.system_attrs.get("fixed_params", {}))  # enqueued: fixed_params
                      for t in trials if t.state == state.WAITING}
            tried = {key(t.params) for t in trials if t.state.is_finished()}
            for p in left:  # points Optuna counts as done that have no finished run (a failed trial, a deleted run)
                if key(p) in tried and key(p) not in queued:
                    study.enqueue_trial(p)
            try:
                study.optimize(objective, n_trials=1)  # a queued trial first (Optuna's rule), else the grid's next
            except ValueError as e:  # Optuna raises a bare ValueError when a trial it ran is no longer RUNNING:
                if "Cannot tell" not in str(e):  # another worker failed it as stale while this one was paused past
                    raise  # the grace period; the run itself finished (metrics.json), which is what counts here
                log.warning("WARNING: %s/%s/%s: %s (a worker judged this one dead while it was paused); its run is "
                            "kept", task, method, stage, e)

    def result_of(self, task: str, method: str, stage: str, p: dict[str, Any]) -> dict[str, Any] | None:
        """The finished trial of a point of stage ``stage``: a grid point (search) or ``{"seed": s}`` (final)."""
        if stage == "final":
            return self.result(task, method, self.choose(task, method), p["seed"], "final")
        return self.result(task, method, p, self.seeds[0], "search")

    def _advance(self, task: str, method: str) -> bool:
        """One method's search, then its final runs, as far as this worker can take them; True once both are done
        (or every grid point collapsed), False while other live workers hold trials that are left."""
        if not self._stage(task, method, "search", self.grids[method],
                           lambda p: self.run_trial(task, method, p, self.seeds[0], "search")):
            return False
        best = self.choose(task, method)
        if best is None:
            log.warning("WARNING: every grid point of %s on %s collapsed; no final runs", method, task)
            return True
        return self._stage(task, method, "final", {"seed": self.seeds},
                           lambda p: self.run_trial(task, method, best, p["seed"], "final"))

    def run(self) -> Path:
        """Search, final runs and the report for every task and method; returns ``report.md``'s path. A worker
        whose method has only trials other workers hold (a final stage of one seed left, say) goes on to the next
        method's trials rather than wait, and comes back to it on its next pass."""
        self.out.mkdir(parents=True, exist_ok=True)
        pending = [(task, method) for task in self.tasks for method in self.methods]
        while pending:
            start = time.monotonic()
            pending = [(task, method) for task, method in pending if not self._advance(task, method)]
            if pending and time.monotonic() - start < HEARTBEAT_S:
                time.sleep(HEARTBEAT_S)  # a pass shorter than a heartbeat: what is left is other workers' trials
        return write_report(self.summary(), self.out)

    def summary(self) -> dict[str, Any]:
        """Per task and method: the chosen point, its final runs, the search's points (see :func:`write_report`)."""
        out: dict[str, Any] = {}
        for task in self.tasks:
            for method in self.methods:
                search = [{"point": p, **(self.result(task, method, p, self.seeds[0], "search") or {})}
                          for p in points(self.grids[method])]
                best = self.choose(task, method)
                finals = [r for s in self.seeds if best is not None
                          for r in [self.result(task, method, best, s, "final")] if r is not None]
                out.setdefault(task, {})[method] = {"chosen": best, "final": finals, "search": search,
                                                    "seeds": list(self.seeds)}
        return out


def in_use(run: Path) -> bool:
    """Whether another process holds the run directory's lock (``RUN/.lock``, :func:`mslora.engine.loop.run_lock`)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(run / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def tested(searched: dict[str, Any], parent: Path) -> dict[str, Any]:
    """The final run of the search's own seed: that search run trained it already (the same config but ``test``),
    so its best epoch's adapter is evaluated on the test split (:func:`mslora.engine.loop.evaluate_adapter`, the
    path ``mslora eval`` takes) instead of training it again. Writes ``PARENT/<run>/metrics.json`` (the search
    run's metrics, its test metrics added, ``tested_from`` naming it) and its config; returns the metrics."""
    from mslora.engine.loop import evaluate_adapter

    source = Path(searched["run"])
    test = {k: v for k, v in evaluate_adapter(source).items() if k.startswith("test_")}
    run = parent / source.name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text((source / "config.yaml").read_text())
    metrics = {k: v for k, v in searched.items() if k != "run"} | test | {"tested_from": str(source)}
    atomic_write(run / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    return {**metrics, "run": str(run)}


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of ``values`` (n - 1 degrees of freedom); None for fewer than 2 values."""
    from scipy import stats

    if len(values) < 2:
        return None
    mean, sem = statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * sem
    return mean - half, mean + half


def summarise(methods: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method of a task: chosen point, test metric (%) over the seeds that did not collapse (mean, std,
    95% t interval), trainable parameters, training seconds, collapsed runs, and the paired comparison with the best
    method (mean difference over the seeds both ran, its t interval; ``distinguishable`` False where the method's
    interval overlaps the best one's)."""
    rows = []
    for method, info in methods.items():
        ok = [r for r in info["final"] if not r.get("collapsed")]
        metric = get_task(ok[0]["task"]).best_metric if ok else None
        values = {r["seed"]: 100 * r[f"test_{metric}"] for r in ok if r.get(f"test_{metric}") is not None}
        ci = t_interval(list(values.values()))
        rows.append({
            "method": method, "chosen": info["chosen"], "metric": metric, "seeds": sorted(values),
            "test": values, "mean": statistics.mean(values.values()) if values else None,
            "std": statistics.stdev(values.values()) if len(values) > 1 else None, "ci95": ci,
            "trainable_params": ok[0]["trainable_params"] if ok else None,
            "seconds_train": statistics.mean(r["seconds_train"] for r in ok) if ok else None,
            "collapsed": [f"seed {r.get('seed')}: {r.get('collapse_reason')}" for r in info["final"]
                          if r.get("collapsed")],
            "search_collapsed": [point_name(s["point"]) for s in info["search"] if s.get("collapsed")],
            "finished": f"{sum('run' in s for s in info['search'])}/{len(info['search'])} search, "
                        f"{len(info['final'])}/{len(info.get('seeds', info['final']))} final",
        })
    ranked = [r for r in rows if r["mean"] is not None]
    if ranked:
        best = max(ranked, key=lambda r: r["mean"])
        for r in ranked:
            common = sorted(set(r["test"]) & set(best["test"]))
            diffs = [r["test"][s] - best["test"][s] for s in common]
            r["best"] = r is best
            r["paired_diff"] = statistics.mean(diffs) if diffs else None
            r["paired_ci95"] = t_interval(diffs) if r is not best else None
            overlap = (r["ci95"] is None or best["ci95"] is None or r["ci95"][1] >= best["ci95"][0])
            r["distinguishable"] = None if r is best else not overlap
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_report(summary: dict[str, Any], output: Path) -> Path:
    """Write ``report.md``, ``report.json`` and ``metric_vs_params.png`` (one per task when there are several) into
    ``output``; returns report.md's path."""
    lines, data = [], {}
    for task, methods in summary.items():
        rows = summarise(methods)
        data[task] = rows
        metric = next((r["metric"] for r in rows if r["metric"]), "metric")
        lines += [f"## {task}", "", f"Test {metric} (%) of the point chosen on validation, over the seeds of the final "
                  "runs: mean ± sample std, 95% t interval; paired difference to the best method over the same seeds.",
                  "", "| method | chosen (on val) | test mean ± std | 95% interval | per seed | trainable params | "
                  "train s | vs best (paired) | distinguishable from best | collapsed | runs finished |",
                  "| --- " * 11 + "|"]
        ranked = sorted(rows, key=lambda r: -(r["mean"] if r["mean"] is not None else -math.inf))  # table and legend
        for r in ranked:
            ci = f"[{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]" if r["ci95"] else "-"
            paired = "best" if r.get("best") else (
                f"{_fmt(r.get('paired_diff'))}" + (f" [{_fmt(r['paired_ci95'][0])}, {_fmt(r['paired_ci95'][1])}]"
                                                   if r.get("paired_ci95") else ""))
            dist = {None: "-", True: "yes", False: "no (intervals overlap)"}[r.get("distinguishable")]
            if r.get("best"):
                dist = "-"
            collapsed = "; ".join(r["collapsed"] + [f"search {p}" for p in r["search_collapsed"]]) or "none"
            std = f" ± {_fmt(r['std'])}" if r["std"] is not None else ""
            per_seed = ", ".join(f"{s}: {_fmt(r['test'][s])}" for s in r["seeds"])
            lines.append(f"| {r['method']} | {point_name(r['chosen'] or {})} | {_fmt(r['mean'])}{std} | {ci} | "
                         f"{per_seed} | {r['trainable_params'] or '-':,} | {_fmt(r['seconds_train'], 0)} | "
                         f"{paired} | {dist} | {collapsed} | {r['finished']} |" if r["trainable_params"] else
                         f"| {r['method']} | {point_name(r['chosen']) if r['chosen'] else '-'} | - | - | - | - | - | - | - | "
                         f"{collapsed} | {r['finished']} |")
        plot = _plot(ranked, output, task if len(summary) > 1 else None)
        if plot is not None:
            lines += ["", f"![{plot.stem}]({plot.name})", ""]
    (output / "report.json").write_text(json.dumps({"summary": data, "runs": summary}, indent=1, default=str) + "\n")
    (output / "report.md").write_text("# mslora tune\n\n" + "\n".join(lines) + "\n")
    return output / "report.md"


def _plot(rows: list[dict[str, Any]], output: Path, task: str | None) -> Path | None:
    """Test metric against trainable parameters (log scale), each method's mean with its 95% interval; the legend
    lists ``rows`` in their order (the report's: best mean first)."""
    rows = [r for r in rows if r["mean"] is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    # a legend, not labels at the points: methods with close parameter counts (LoRA / DoRA) overprint each other;
    # colour and marker both vary so that no two of up to 20 methods look alike
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>ph*"
    for i, r in enumerate(rows):
        lo, hi = r["ci95"] or (r["mean"], r["mean"])
        ax.errorbar([r["trainable_params"]], [r["mean"]], yerr=[[r["mean"] - lo], [hi - r["mean"]]], capsize=3,
                    fmt=markers[i % len(markers)], color=colours[i % len(colours)], label=r["method"])
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=f"test {rows[0]['metric']} (%), mean and 95% interval",
           title=f"Tuned methods{f' on {task}' if task else ''}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = output / (f"metric_vs_params_{task}.png" if task else "metric_vs_params.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _worker(kwargs: dict[str, Any], threads: int) -> None:
    """One local worker process: its share of the cores, the same tune."""
    import torch

    torch.set_num_threads(threads)
    Tune(**kwargs).run()


def tune(workers: int = 1, report_only: bool = False, **kwargs) -> Path:
    """Build the :class:`Tune` (every trial's configuration checked), then run it in ``workers`` local processes
    sharing the storage (each with cores / workers threads); returns ``report.md``'s path. With ``report_only``
    nothing is trained: the report is written from the trials finished so far (a tune still running, or stopped),
    each method's row saying how far its search and final runs got.

    Raises:
        ValueError / FileNotFoundError: see :class:`Tune` (before anything is written); FileNotFoundError also for
            ``report_only`` on an output folder that holds no trials.
    """
    job = Tune(**kwargs)
    if report_only:
        if not (job.out / "trials").is_dir():
            raise FileNotFoundError(f"{job.out} holds no trials (trials/) to report on")
        return write_report(job.summary(), job.out)
    if workers <= 1:
        return job.run()
    job.out.mkdir(parents=True, exist_ok=True)
    _ = job.rdb  # creates the schema before the workers start (they would otherwise race in it and retry)
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_worker, args=(kwargs, threads)) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise RuntimeError(f"{len(bad)} of {workers} tune workers failed (exit codes {bad}); run the command again "
                           "to resume")
    return write_report(job.summary(), job.out)

"""Running experiments: one JSON file per (experiment, seed), checked, atomic, resumable.

Layout of an output directory ``OUT`` (default ``bnorm-out/lab``)::

    OUT/lab.json                       the run: quick or full, seeds, machine, versions, times
    OUT/<experiment>/seed-<k>.json     one seed's results, its config and a SHA-256 checksum
    OUT/<experiment>/summary.json      numbers, headline, table rows, decision, plot file names
    OUT/<experiment>/*.png             the plots
    OUT/report.html                    everything above in one self-contained page

A seed file is reused when it is intact and was made with the same config, so an interrupted
run started again resumes where it stopped; a changed config (quick vs full) recomputes it.
Every file read back is **untrusted**: one that is not UTF-8 JSON, lacks a key, or whose content
does not match its checksum (a damaged or hand-edited file) is named in a one-line warning on
stderr, moved aside to ``<name>.corrupt``, and recomputed (``bnorm lab report`` skips that
experiment and carries on with the rest). Files are written with the user's umask.

**Seeds.** Each experiment starts with its own number of seeds (``Experiment.seeds``), numbered
from ``first_seed``. When every experiment has run, those whose verdict is "inconclusive" get
one more seed each, round after round, until they decide, reach ``Experiment.max_seeds``, or
one more seed would not fit the time budget (20 minutes for a full run, 2 for a quick one).

Under ``torchrun --nproc-per-node N -m bnorm lab run ...`` every rank runs the same experiments
and seeds in the same order (the training loops are data-parallel, see :mod:`bnorm.lab.train`);
rank 0 alone decides what to resume and which seed to add, writes files and shows progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import __version__
from .. import distributed as bd
from .experiment import JSON, VERDICTS, Decision, Experiment
from .experiments import all_experiments, get

# Whole-run time budgets (seconds) within which inconclusive experiments may get more seeds.
BUDGET = {True: 110.0, False: 19 * 60.0}
SEED_KEYS = ("experiment", "seed", "config", "seconds", "result", "sha256")


class CorruptFile(ValueError):
    """A result file that cannot be trusted: unreadable, incomplete, or not what it claims."""


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that ``path`` holds either the old or the complete new content, never half.

    NaN is refused: it is not JSON (experiments record a missing number as None).
    """
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in the same directory, flush it to disk, and move it
    over ``path`` with :func:`os.replace` (atomic on POSIX): a crash leaves old or new, never half.
    The file gets the permissions of an ordinary new file (0666 less the umask), not the 0600
    of :func:`tempfile.mkstemp`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """Parse ``path`` as UTF-8 JSON; :class:`CorruptFile` (naming the file) if it is not."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFile(f"{path}: not valid UTF-8 JSON ({err})") from None


def warn(message: str) -> None:
    """One line on stderr (not :mod:`warnings`, whose output takes two)."""
    print(f"bnorm lab: warning: {message}", file=sys.stderr, flush=True)


def set_aside(path: Path, why: str, then: str = "recomputing it") -> None:
    """Move a bad file to ``<name>.corrupt`` and say so in one line."""
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    warn(f"{why}; moved to {aside.name}, {then}")


def _checksum(record: JSON) -> str:
    body = {k: record[k] for k in SEED_KEYS if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seed_record(exp: Experiment, seed: int, cfg: JSON, seconds: float, result: JSON) -> JSON:
    """A seed file's content, with the checksum of everything else in it."""
    record = {"experiment": exp.name, "seed": seed, "config": cfg, "seconds": seconds}
    record["result"] = result
    record["sha256"] = _checksum(record | {"sha256": ""})
    return record


def check_seed_record(record: Any, path: Path, exp: Experiment, seed: int) -> JSON:
    """``record`` if it is a whole, unedited seed file of ``exp`` and ``seed``; else
    :class:`CorruptFile` saying what is wrong with ``path``."""
    if not isinstance(record, dict):
        raise CorruptFile(f"{path}: not a seed file (a JSON {type(record).__name__})")
    missing = [k for k in SEED_KEYS if k not in record]
    if missing:
        raise CorruptFile(f"{path}: missing {', '.join(missing)}")
    try:
        good = record["sha256"] == _checksum(record)
    except (TypeError, ValueError):
        good = False
    if not good:
        raise CorruptFile(f"{path}: content does not match its checksum (edited or damaged)")
    if record["experiment"] != exp.name or record["seed"] != seed:
        raise CorruptFile(
            f"{path}: holds {record['experiment']!r} seed {record['seed']}, not "
            f"{exp.name!r} seed {seed}"
        )
    return record


def load_seed(out: Path, exp: Experiment, seed: int, cfg: JSON, then: str) -> JSON | None:
    """The checked record of ``seed`` made with ``cfg``, or None when it must be (re)computed.

    A damaged file is set aside with a warning that ends with ``then``; a file made with another
    config (e.g. a quick run's, now that a full run is asked) is simply recomputed.
    """
    path = seed_path(out, exp, seed)
    if not path.exists():
        return None
    try:
        record = check_seed_record(read_json(path), path, exp, seed)
    except CorruptFile as err:
        set_aside(path, str(err), then)
        return None
    return record if record["config"] == cfg else None


def machine_kind() -> str:
    """E.g. ``x86_64, 2 cores``: what the numbers were measured on."""
    return f"{platform.machine()}, {os.cpu_count()} cores"


def select(names: Sequence[str]) -> list[Experiment]:
    """Experiments by command-line name; ``all`` selects every one, in report order."""
    if not names or "all" in names:
        return all_experiments()
    return [get(n) for n in names]


def _rank0_says(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (itself when not distributed).

    Only rank 0 reads and writes the output directory, so whether a seed is already done, and
    which seed comes next, is its decision; the others follow it, or they would wait in a
    collective rank 0 never enters.
    """
    if bd.world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_path(out: Path, exp: Experiment, seed: int) -> Path:
    return out / exp.name / f"seed-{seed}.json"


def finalize(out: Path, exp: Experiment, records: Sequence[JSON], cfg: JSON, quick: bool) -> JSON:
    """Summarize, decide, plot; write ``summary.json``; return it."""
    results = [r["result"] for r in records]
    summary = exp.summarize(results, cfg)
    decision = exp.decide(summary.numbers)
    if not isinstance(decision, Decision) or decision.verdict not in VERDICTS:
        raise ValueError(f"{exp.name}: decide() returned {decision!r}, not a Decision")
    plots = exp.plot(results, cfg, out / exp.name)
    record = {
        "name": exp.name,
        "title": exp.title,
        "claim": exp.claim,
        "setup": exp.setup,
        "rule": exp.rule,
        "config": cfg,
        "quick": quick,
        "seeds": len(records),
        "seed_list": [int(r["seed"]) for r in records],
        "max_seeds": exp.max_seeds[0 if quick else 1],
        "numbers": summary.numbers,
        "headline": summary.headline,
        "rows": summary.rows,
        "notes": summary.notes,
        "verdict": decision.verdict,
        "checks": [c.to_json() for c in decision.checks],
        "plots": plots,
        "seconds": sum(float(r.get("seconds", 0.0)) for r in records),
    }
    write_json_atomic(out / exp.name / "summary.json", record)
    return record


def _read_manifest(path: Path) -> JSON:
    """``lab.json`` for a run that resumes: a damaged one is set aside and started afresh."""
    if not path.exists():
        return {}
    try:
        manifest = read_json(path)
        if not isinstance(manifest, dict):
            raise CorruptFile(f"{path}: not a lab manifest (a JSON {type(manifest).__name__})")
    except CorruptFile as err:
        set_aside(path, str(err), "starting a new one")
        return {}
    return manifest


class _Plan:
    """One experiment's state in a run: its config, its seeds so far, its last summary."""

    def __init__(self, exp: Experiment, cfg: JSON, start: int, limit: int, first_seed: int):
        self.exp, self.cfg, self.start, self.limit = exp, cfg, start, max(limit, start)
        self.first_seed = first_seed
        self.records: list[JSON] = []
        self.summary: JSON | None = None

    def next_seed(self) -> int:
        return self.first_seed + len(self.records)

    def seconds_per_seed(self) -> float:
        return sum(float(r["seconds"]) for r in self.records) / max(1, len(self.records))

    def wants_more(self) -> bool:
        return (
            self.summary is not None
            and self.summary["verdict"] == "inconclusive"
            and len(self.records) < self.limit
        )


def run_lab(
    names: Sequence[str],
    *,
    quick: bool = False,
    seeds: int | None = None,
    max_seeds: int | None = None,
    first_seed: int = 0,
    budget: float | None = None,
    out: Path = Path("bnorm-out/lab"),
    progress: bool = True,
    threads: int | None = 1,
) -> list[JSON]:
    """Run the named experiments (``["all"]`` for every one), then write the report.

    Args:
        names: command-line names of experiments, or ``["all"]``.
        quick: the CI-sized configs (within two minutes for all ten) instead of the full ones.
        seeds: seeds to start each experiment with; default each experiment's own.
        max_seeds: at most this many seeds per experiment while its verdict is inconclusive;
            default each experiment's own maximum (never fewer than ``seeds``).
        first_seed: the seeds are ``first_seed, first_seed + 1, …`` (disjoint sets for
            :func:`run_stability`).
        budget: seconds from the start of this call after which no seed is added; default
            :data:`BUDGET` (quick or full). The starting seeds always run.
        out: output directory; an earlier run there is resumed.
        progress: show a tqdm progress bar.
        threads: torch's (and bnorm's kernels') thread count during the run; None keeps it.
            One by default: the lab's models are small, so a second thread mostly waits, and
            OpenMP threads spinning at barriers slow everything down badly when another
            process (a second rank, a browser, a build) wants the same cores.

    Returns:
        The summary records, in report order.
    """
    from .report import write_report

    out = Path(out)
    if threads is not None:
        torch.set_num_threads(threads)
    budget = BUDGET[quick] if budget is None else budget
    plans = []
    for exp in select(names):
        start = seeds if seeds is not None else exp.seeds[0 if quick else 1]
        limit = max_seeds if max_seeds is not None else exp.max_seeds[0 if quick else 1]
        plans.append(_Plan(exp, exp.config(quick), start, limit, first_seed))
    started = time.time()
    main = bd.is_main_process()
    manifest_path = out / "lab.json"
    manifest = _read_manifest(manifest_path) if main else {}
    manifest.update(
        {
            "quick": quick,
            "machine": machine_kind(),
            "torch": torch.__version__,
            "bnorm": __version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "budget_seconds": budget,
        }
    )
    if not isinstance(manifest.get("experiments"), dict):
        manifest["experiments"] = {}

    def one_seed(plan: _Plan, bar: tqdm) -> None:
        seed = plan.next_seed()
        bar.set_postfix_str(f"{plan.exp.name} seed {seed}")
        record = load_seed(out, plan.exp, seed, plan.cfg, "recomputing it") if main else None
        if not _rank0_says(record is not None):
            t0 = time.perf_counter()
            result = plan.exp.run(seed, plan.cfg)
            record = seed_record(plan.exp, seed, plan.cfg, time.perf_counter() - t0, result)
            if main:
                write_json_atomic(seed_path(out, plan.exp, seed), record)
        plan.records.append(record or {"seed": seed, "seconds": 0.0})
        bar.update(1)

    def settle(plan: _Plan) -> None:
        if not main:
            return
        plan.summary = finalize(out, plan.exp, plan.records, plan.cfg, quick)
        manifest["experiments"][plan.exp.name] = {
            "quick": quick,
            "seeds": [int(r["seed"]) for r in plan.records],
        }
        manifest["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        manifest["seconds"] = round(time.time() - started, 1)
        write_json_atomic(manifest_path, manifest)

    total = sum(p.start for p in plans)
    with tqdm(total=total, desc="bnorm lab", unit="run", disable=not (progress and main)) as bar:
        for plan in plans:
            while len(plan.records) < plan.start:
                one_seed(plan, bar)
            settle(plan)
        # Rounds of one more seed for every experiment that cannot decide yet, while the
        # budget lasts: round-robin, so no experiment spends the budget of the others.
        while True:
            added = False
            for plan in plans:
                fits = time.time() - started + plan.seconds_per_seed() <= budget
                if not _rank0_says(main and plan.wants_more() and fits):
                    continue
                bar.total += 1
                bar.set_description("bnorm lab (adding seeds to decide)")
                one_seed(plan, bar)
                settle(plan)
                added = True
            if not added:
                break
    if not main:
        return []
    manifest["world_size"] = bd.world_size()
    manifest["seconds"] = round(time.time() - started, 1)
    write_json_atomic(manifest_path, manifest)
    records = [p.summary for p in plans if p.summary is not None]
    write_report(out)
    return records


def manifest_seeds(info: Any) -> list[int]:
    """The seeds a manifest entry lists (older manifests gave a count: seeds 0…n-1)."""
    seeds = info["seeds"]
    return list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]


def summarize_dir(out: Path) -> list[JSON]:
    """Recompute every experiment's summary, verdict and plots from the seed files in ``out``.

    A damaged seed file is named, set aside, and its experiment left out of the report (with a
    warning saying how to recompute it); the other experiments carry on. A missing or damaged
    ``lab.json`` raises :class:`CorruptFile` or :class:`FileNotFoundError`: without it the
    directory's run is unknown.
    """
    out = Path(out)
    manifest = read_json(out / "lab.json")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("experiments"), dict):
        raise CorruptFile(f"{out / 'lab.json'}: not a lab manifest")
    records = []
    for exp in all_experiments():
        info = manifest["experiments"].get(exp.name)
        if info is None:
            continue
        try:
            quick = bool(info["quick"])
            wanted = manifest_seeds(info)
        except (KeyError, TypeError, ValueError):
            warn(f"{out / 'lab.json'}: the entry of {exp.name} is damaged; leaving it out")
            continue
        cfg = exp.config(quick)
        again = f"leaving {exp.name} out (bnorm lab run {exp.name} --out {out} recomputes it)"
        loaded = []
        for seed in wanted:
            path = seed_path(out, exp, seed)
            if not path.exists():
                warn(f"{path}: missing; {again}")
                break
            try:
                record = check_seed_record(read_json(path), path, exp, seed)
            except CorruptFile as err:
                set_aside(path, str(err), again)
                break
            if record["config"] != cfg:
                warn(f"{path}: made with another config than lab.json says; {again}")
                break
            loaded.append(record)
        else:
            records.append(finalize(out, exp, loaded, cfg, quick))
    return records


def run_stability(
    names: Sequence[str] = ("all",),
    *,
    quick: bool = False,
    out: Path = Path("bnorm-out/lab-stability"),
    first_seeds: tuple[int, int] = (0, 1000),
    progress: bool = True,
    threads: int | None = 1,
    budget: float | None = None,
    seeds: int | None = None,
    table_only: bool = False,
) -> str:
    """Run the lab (``names``, default all) twice with disjoint seed sets; write and return a
    Markdown table.

    The runs go to ``out/seeds-<first>`` (each resumable, each with its report); the table
    (``out/stability.md``) lists per claim both verdicts, their checks' intervals and seeds,
    and flags a claim "supported" in one run and "not supported" in the other. ``table_only``
    trains nothing: it reads the two runs' summaries as they are (e.g. after running them as
    two ``bnorm lab run --first-seed`` processes side by side).
    """
    out = Path(out)
    runs = []
    for first in first_seeds:
        t0 = time.time()
        if table_only:
            run_out = out / f"seeds-{first}"
            wanted = {e.name for e in select(names)}
            records = [
                r
                for r in (
                    read_json(run_out / e.name / "summary.json")
                    for e in all_experiments()
                    if e.name in wanted and (run_out / e.name / "summary.json").exists()
                )
            ]
            manifest = read_json(run_out / "lab.json")
            runs.append((first, records, float(manifest.get("seconds", 0.0))))
            continue
        records = run_lab(
            names,
            quick=quick,
            first_seed=first,
            out=out / f"seeds-{first}",
            progress=progress,
            threads=threads,
            budget=budget,
            seeds=seeds,
        )
        runs.append((first, records, time.time() - t0))
    text = stability_table(runs, quick, names)
    write_text_atomic(out / "stability.md", text)
    return text


def _seeds_text(seeds: Sequence[int]) -> str:
    seeds = sorted(seeds)
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ", ".join(map(str, seeds))


def stability_table(
    runs: Sequence[tuple[int, Sequence[JSON], float]],
    quick: bool,
    names: Sequence[str] = ("all",),
) -> str:
    """The Markdown page of :func:`run_stability` from its two runs' summary records."""
    from .verdict import interval_text_json

    (fa, ra, ta), (fb, rb, tb) = runs
    by_b = {r["name"]: r for r in rb}
    which = (
        "every experiment of the lab"
        if "all" in names
        else "the experiments " + ", ".join(f"`{r['name']}`" for r in ra)
    )
    lines = [
        "# Lab stability: two runs with disjoint seeds",
        "",
        f"`bnorm lab stability{' --quick' if quick else ''}` ran {which} "
        f"twice ({'quick' if quick else 'full'} configs), from seeds {fa}… and from seeds {fb}…, "
        f"on {machine_kind()} (run A "
        f"{ta / 60:.1f} min, run B {tb / 60:.1f} min; other processes shared the machine). "
        "Each check is the mean of per-seed paired values with its 95% t-interval; a verdict "
        "is *supported* or *not supported* only when every interval clears the rule's margin, "
        "*inconclusive* otherwise. A claim is **unstable** when one run supports it and the "
        "other does not.",
        "",
        "| claim | run A verdict | run A intervals (seeds) | run B verdict | "
        "run B intervals (seeds) | stable |",
        "|---|---|---|---|---|---|",
    ]
    flips = 0
    for a in ra:
        b = by_b.get(a["name"])
        if b is None:
            continue
        unstable = {a["verdict"], b["verdict"]} == {"supported", "not supported"}
        flips += unstable

        def cell(r: JSON) -> str:
            checks = "; ".join(f"{c['label']}: {interval_text_json(c)}" for c in r["checks"])
            return f"{checks} ({_seeds_text(r['seed_list'])})"

        lines.append(
            f"| {a['name']} | {a['verdict']} | {cell(a)} | {b['verdict']} | {cell(b)} | "
            f"{'**no**' if unstable else 'yes'} |"
        )
    lines += [
        "",
        f"Claims supported in one run and not supported in the other: {flips} of {len(ra)}.",
        "",
    ]
    return "\n".join(lines)

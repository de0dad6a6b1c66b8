"""Running experiments: one JSON file per (experiment, seed), written atomically, resumable.

Layout of an output directory ``OUT`` (default ``bnorm-out/lab``)::

    OUT/lab.json                       the run: quick or full, seeds, machine, versions, times
    OUT/<experiment>/seed-<k>.json     one seed's results with the config they were made with
    OUT/<experiment>/summary.json      numbers, headline, table rows, verdict, plot file names
    OUT/<experiment>/*.png             the plots
    OUT/report.html                    everything above in one self-contained page

A seed file is reused when it exists and was made with the same config, so an interrupted run
started again resumes where it stopped; a changed config (quick vs full) recomputes it.

Under ``torchrun --nproc-per-node N -m bnorm lab run ...`` every rank runs the same experiments
and seeds in the same order (the training loops are data-parallel, see :mod:`bnorm.lab.train`);
rank 0 alone decides what to resume, writes files and shows progress.
"""

from __future__ import annotations

import json
import os
import platform
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
from .experiment import JSON, VERDICTS, Experiment
from .experiments import all_experiments, get


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that ``path`` holds either the old or the complete new content, never half.

    NaN is refused: it is not JSON (experiments record a missing number as None).
    """
    write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file in the same directory, flush it to disk, and move it
    over ``path`` with :func:`os.replace` (atomic on POSIX): a crash leaves old or new, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def machine_kind() -> str:
    """E.g. ``x86_64, 2 cores``: what the numbers were measured on."""
    return f"{platform.machine()}, {os.cpu_count()} cores"


def select(names: Sequence[str]) -> list[Experiment]:
    """Experiments by command-line name; ``all`` selects every one, in report order."""
    if not names or "all" in names:
        return all_experiments()
    return [get(n) for n in names]


def _rank0_says(flag: bool) -> bool:
    """Rank 0's value of ``flag`` on every rank (itself when not distributed).

    Only rank 0 reads and writes the output directory, so whether a seed is already done is its
    decision; the others follow it, or they would wait in a collective rank 0 never enters.
    """
    if bd.world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def seed_path(out: Path, exp: Experiment, seed: int) -> Path:
    return out / exp.name / f"seed-{seed}.json"


def load_results(out: Path, exp: Experiment, seeds: int, cfg: JSON) -> list[JSON] | None:
    """The results of seeds 0..seeds-1 made with ``cfg``, or None if any is missing."""
    results = []
    for seed in range(seeds):
        path = seed_path(out, exp, seed)
        if not path.exists():
            return None
        record = read_json(path)
        if record.get("config") != cfg:
            return None
        results.append(record["result"])
    return results


def finalize(out: Path, exp: Experiment, results: Sequence[JSON], cfg: JSON, quick: bool) -> JSON:
    """Summarize, decide, plot; write ``summary.json``; return it."""
    summary = exp.summarize(results, cfg)
    verdict = exp.decide(summary.numbers)
    if verdict not in VERDICTS:
        raise ValueError(f"{exp.name}: decide() returned {verdict!r}, not one of {VERDICTS}")
    plots = exp.plot(results, cfg, out / exp.name)
    record = {
        "name": exp.name,
        "title": exp.title,
        "claim": exp.claim,
        "setup": exp.setup,
        "rule": exp.rule,
        "config": cfg,
        "quick": quick,
        "seeds": len(results),
        "numbers": summary.numbers,
        "headline": summary.headline,
        "rows": summary.rows,
        "verdict": verdict,
        "plots": plots,
        "seconds": sum(float(r.get("seconds", 0.0)) for r in _records(out, exp, len(results))),
    }
    write_json_atomic(out / exp.name / "summary.json", record)
    return record


def _records(out: Path, exp: Experiment, seeds: int) -> list[JSON]:
    return [read_json(seed_path(out, exp, s)) for s in range(seeds)]


def run_lab(
    names: Sequence[str],
    *,
    quick: bool = False,
    seeds: int | None = None,
    out: Path = Path("bnorm-out/lab"),
    progress: bool = True,
    threads: int | None = 1,
) -> list[JSON]:
    """Run the named experiments (``["all"]`` for every one), then write the report.

    Args:
        names: command-line names of experiments, or ``["all"]``.
        quick: the CI-sized configs (minutes for all ten) instead of the full ones.
        seeds: seeds per experiment; default each experiment's own (quick or full).
        out: output directory; an earlier run there is resumed.
        progress: show tqdm progress bars.
        threads: torch's (and bnorm's kernels') thread count during the run; None keeps it.
            One by default: the lab's models are small, so a second thread mostly waits, and
            OpenMP threads spinning at barriers slow everything down badly when another
            process (a second rank, a browser, a build) wants the same cores.

    Returns:
        The summary records, in order.
    """
    from .report import write_report

    out = Path(out)
    if threads is not None:
        torch.set_num_threads(threads)
    experiments = select(names)
    plan = []
    for exp in experiments:
        cfg = exp.config(quick)
        n = seeds if seeds is not None else exp.seeds[0 if quick else 1]
        plan.append((exp, cfg, n))
    started = time.time()
    manifest_path = out / "lab.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    manifest.update(
        {
            "quick": quick,
            "machine": machine_kind(),
            "torch": torch.__version__,
            "bnorm": __version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        }
    )
    manifest.setdefault("experiments", {})
    total = sum(n for _, _, n in plan)
    records = []
    main = bd.is_main_process()
    with tqdm(total=total, desc="bnorm lab", unit="run", disable=not (progress and main)) as bar:
        for exp, cfg, n in plan:
            for seed in range(n):
                bar.set_postfix_str(f"{exp.name} seed {seed}")
                path = seed_path(out, exp, seed)
                done = main and path.exists() and read_json(path).get("config") == cfg
                if _rank0_says(done):
                    bar.update(1)  # resumed: made earlier with the same config
                    continue
                t0 = time.perf_counter()
                result = exp.run(seed, cfg)
                seconds = time.perf_counter() - t0
                if not main:
                    continue
                write_json_atomic(
                    path,
                    {
                        "experiment": exp.name,
                        "seed": seed,
                        "config": cfg,
                        "seconds": seconds,
                        "result": result,
                    },
                )
                bar.update(1)
            if not main:
                continue
            results = load_results(out, exp, n, cfg)
            assert results is not None  # every seed file was just checked or written
            record = finalize(out, exp, results, cfg, quick)
            records.append(record)
            manifest["experiments"][exp.name] = {"seeds": n, "quick": quick}
            manifest["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            write_json_atomic(manifest_path, manifest)
    if main:
        manifest["world_size"] = bd.world_size()
        write_json_atomic(manifest_path, manifest)
        write_report(out)
    return records


def summarize_dir(out: Path) -> list[JSON]:
    """Recompute every experiment's summary, verdict and plots from the seed files in ``out``."""
    out = Path(out)
    manifest = read_json(out / "lab.json")
    records = []
    for exp in all_experiments():
        info = manifest.get("experiments", {}).get(exp.name)
        if info is None:
            continue
        cfg = exp.config(bool(info["quick"]))
        results = load_results(out, exp, int(info["seeds"]), cfg)
        if results is None:
            raise FileNotFoundError(
                f"bnorm lab report: {out / exp.name} lacks seed files made with the "
                f"{'quick' if info['quick'] else 'full'} config; run `bnorm lab run {exp.name}` "
                f"--out {out} again"
            )
        records.append(finalize(out, exp, results, cfg, bool(info["quick"])))
    return records

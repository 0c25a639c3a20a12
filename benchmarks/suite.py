"""`python -m benchmarks` (also `charclip bench`): every benchmark, one progress bar, one results folder.

Writes results.json, results.md and PNG plots to benchmarks/results/<machine>/ (or --out);
--quick writes to benchmarks/results/<machine>-quick/ and --only to <machine>-partial/ (neither
committed), so a quick look never replaces the full run's committed results.
Full mode covers a representative subset of the grid (cells at the default size, hidden
sizes 128-1024 and sequence lengths 32-512 around the default); --quick a smaller one
that finishes in about 40 s on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from charclip import runfolder
from charclip.config import BenchOptions
from charclip.errors import CharclipError

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Plan:
    repeats: int
    cells: tuple[str, ...]  # extra cells at the default size (the default cell is always there)
    seqs: tuple[int, ...]
    hiddens: tuple[int, ...]
    unrolls: tuple[int, ...]
    clip_sizes: tuple[int, ...]
    clip_tensors: tuple[int, ...]
    clip_tensors_total: int
    copy_elements: int
    fresh_processes: bool


QUICK = Plan(
    repeats=3,
    cells=(),
    seqs=(32, 64, 128),
    hiddens=(64, 128, 256),
    unrolls=(2,),
    clip_sizes=(10**4, 10**5, 10**6, 10**7),
    clip_tensors=(1, 10, 100),
    clip_tensors_total=10**6,
    copy_elements=25 * 10**6,
    fresh_processes=False,
)
FULL = Plan(
    repeats=5,
    cells=("rnn", "gru"),
    seqs=(32, 64, 128, 256, 512),
    hiddens=(128, 256, 512, 1024),
    unrolls=(2, 4, 8),
    clip_sizes=(10**4, 10**5, 10**6, 10**7, 10**8),
    clip_tensors=(1, 10, 100, 1000),
    clip_tensors_total=10**7,
    copy_elements=10**8,
    fresh_processes=True,
)


def add_parser(sub) -> None:
    # imported here: cli imports this module to register it
    from charclip.cli import HelpFormatter, add_options

    p = sub.add_parser(
        "bench",
        help="benchmark both backends and clipping; write results and plots",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=HelpFormatter,
    )
    add_options(p, BenchOptions)
    p.set_defaults(func=run)


def _tasks(plan: Plan, device: str, torch_threads: int):
    """(name, function) pairs; each function stores its result in the shared dict `r`."""
    from charclip.benchmarks import clip_cost, training
    from charclip.benchmarks.training import Case

    d = Case.default()
    reps = plan.repeats
    tasks = []

    def add(name):
        def deco(fn):
            tasks.append((name, fn))
            return fn

        return deco

    @add("sgemm peak")
    def _(r):
        r["peak"] = training.sgemm_peak(device, reps)

    @add("copy bandwidth")
    def _(r):
        r["clipping"]["copy_bandwidth"] = clip_cost.copy_bandwidth(plan.copy_elements, reps)

    cases = [d, dataclasses.replace(d, clip=False)] + [
        dataclasses.replace(d, cell=c) for c in plan.cells if c != d.cell
    ]
    for c in cases:

        @add(f"throughput {c.label}")
        def _(r, c=c):
            r["throughput"].append(
                training.throughput(c, device=device, repeats=reps, memory=c == d)
            )

    for s in plan.seqs:
        if s != d.seq:

            @add(f"scaling T={s}")
            def _(r, s=s):
                r["throughput"].append(
                    training.throughput(
                        dataclasses.replace(d, seq=s), device=device, repeats=reps, memory=True
                    )
                )

    for h in plan.hiddens:
        if h != d.hidden:

            @add(f"scaling H={h}")
            def _(r, h=h):
                r["throughput"].append(
                    training.throughput(
                        dataclasses.replace(d, hidden=h), device=device, repeats=reps
                    )
                )

    @add("JAX variants")
    def _(r):
        r["variants"]["jax_variants"] = training.jax_variants(
            d, device=device, repeats=reps, unrolls=plan.unrolls
        )

    @add("layer 0 lookup table in torch")
    def _(r):
        r["variants"]["torch_table"] = training.torch_table(d, device=device, repeats=reps)

    @add("torch threads")
    def _(r):
        if device == "cpu":
            r["variants"]["torch_threads"] = training.torch_threads(d, device=device, repeats=reps)

    if plan.fresh_processes:  # compiling is slow; full mode only

        @add("torch.compile")
        def _(r):
            r["variants"]["torch_compile"] = training.torch_compile(d, device=device, repeats=reps)

    @add("cuDNN")
    def _(r):
        r["variants"]["cudnn"] = training.cudnn(d, device=device, repeats=reps)

    if plan.fresh_processes and device == "cpu":

        @add("JAX on one XLA thread")
        def _(r):
            r["variants"]["jax_single_thread"] = training.jax_single_thread(
                d, repeats=reps, torch_threads_n=torch_threads
            )

    for n in plan.clip_sizes:

        @add(f"clip {n:.0e} params")
        def _(r, n=n):
            r["clipping"]["by_size"].append(
                clip_cost.clip_times(clip_cost.split_sizes(n, 10), device=device, repeats=reps)
            )

    for k in plan.clip_tensors:

        @add(f"clip {k} tensors")
        def _(r, k=k):
            r["clipping"]["by_tensors"].append(
                clip_cost.clip_times(
                    clip_cost.split_sizes(plan.clip_tensors_total, k), device=device, repeats=reps
                )
            )

    @add("clip in a step")
    def _(r):
        r["clipping"]["in_step"] = clip_cost.clip_in_step(d, device=device, repeats=max(reps, 5))

    @add("JAX compile time")
    def _(r):
        r["first_step"]["jax_compile_split"] = training.jax_compile_split(d, device)

    if plan.fresh_processes and device == "cpu":

        @add("torch memory (fresh process)")
        def _(r):
            r["scaling"]["torch_rss"] = training.torch_rss(
                d, sorted(set(plan.seqs) | {d.seq}), torch_threads
            )

    if plan.fresh_processes:
        for b in ("torch", "jax"):

            @add(f"fresh {b} process")
            def _(r, b=b):
                r["first_step"][f"fresh_{b}"] = training.first_step_fresh(
                    d, b, device, torch_threads
                )

    return tasks


def _derive(r: dict) -> None:
    """Scaling fits, clipping shares and the goals, computed from the raw measurements."""
    from charclip.benchmarks import harness
    from charclip.benchmarks.report import fit_exponent
    from charclip.benchmarks.training import Case

    d = dataclasses.asdict(Case.default())
    by_case = {json.dumps(t["case"], sort_keys=True): t for t in r["throughput"]}

    def find(**changes):
        return by_case.get(json.dumps({**d, **changes}, sort_keys=True))

    default, noclip = find(), find(clip=False)
    for key, field in (("seq", "seq"), ("hidden", "hidden")):
        pts = sorted(
            (t["case"][field], t)
            for t in r["throughput"]
            if all(t["case"][k] == v for k, v in d.items() if k != field)
        )
        if len(pts) >= 2:
            x = [p[0] for p in pts]
            r["scaling"][key] = {
                "label": f"{d['cell']} {d['layers']} layers, B={d['batch']}",
                "x": x,
                **{b: [p[1][b]["median"] for p in pts] for b in ("torch", "jax")},
            }
            r["scaling"][key]["exponent"] = {
                b: fit_exponent(x, r["scaling"][key][b]) for b in ("torch", "jax")
            }
    rss = r["scaling"].get("torch_rss")
    rss = {m["seq"]: m for m in rss} if isinstance(rss, list) else {}
    mem = []
    for t in sorted((t for t in r["throughput"] if "memory" in t), key=lambda t: t["case"]["seq"]):
        m, j = t["memory"], t["memory"]["jax"]
        q = rss.get(t["case"]["seq"])
        mem.append(
            {
                "seq": t["case"]["seq"],
                "torch_saved_mb": m["torch_saved_for_backward_bytes"] / 2**20,
                "torch_peak_rss_mb": (q["peak_rss_bytes"] - q["rss_before_bytes"]) / 2**20
                if q
                else None,
                "jax_peak_mb": j["peak_estimate_bytes"] / 2**20 if j else None,
                "jax_temp_mb": j["temp_size_in_bytes"] / 2**20 if j else None,
            }
        )
    r["scaling"]["memory"] = mem

    goals = []
    cores = r["environment"]["cores"]
    peak = r.get("peak", {}).get("peak_flop_per_s")
    for t in r["throughput"]:
        if {**t["case"], "cell": d["cell"]} != d:
            continue  # the goals are about each cell at the default size, clipping on
        load = max(t["loadavg"])
        q = t["ratios"]["jax"]
        goals.append(
            {
                "goal": f"JAX (fast layer) >= 1.0x torch, {t['label']}",
                "measured": f"{q['median']:.2f}x (quartiles {q['q1']:.2f}-{q['q3']:.2f}, {q['n']} interleaved rounds)",
                "status": harness.verdict(q["median"] >= 1.0, load, cores),
            }
        )
        if peak:
            share = {b: t[b]["flop_per_s"] / peak for b in ("torch", "jax")}
            goals.append(
                {
                    "goal": f"each backend >= 85% of the sgemm peak, {t['label']}",
                    "measured": f"torch {share['torch']:.0%}, JAX {share['jax']:.0%} of {peak / 1e9:.0f} GFLOP/s",
                    "status": harness.verdict(min(share.values()) >= 0.85, load, cores),
                }
            )
    c = r["clipping"]
    s = c.get("in_step")
    if s and default:
        diff = {}
        for n, v in s["impls"].items():
            backend = "jax" if "jax" in n or "optax" in n else "torch"
            v["share_of_step"] = v["median"] / default[backend]["median"]
        if noclip:
            diff = {
                b: (default[b]["median"] - noclip[b]["median"], noclip[b]["median"])
                for b in ("torch", "jax")
            }
            s["step_difference"] = diff
        lib = {
            n: v["share_of_step"]
            for n, v in s["impls"].items()
            if n.startswith("torch clip_grad_norm_ (foreach)") or n.startswith("optax")
        }
        worst = max(lib.values()) if lib else float("nan")
        goals.append(
            {
                "goal": "clipping <= 1% of a training step, default configuration",
                "measured": ", ".join(f"{n}: {v:.2%}" for n, v in lib.items()),
                "status": "met" if worst <= 0.01 else "not met",
            }
        )
    big = max(c.get("by_size") or [], key=lambda row: row["params"], default=None)
    if big and "copy_bandwidth" in c:
        bw = c["copy_bandwidth"]["best_bytes_per_s"]
        name, best = max(big["impls"].items(), key=lambda kv: kv[1]["bytes_per_s"])
        frac = best["bytes_per_s"] / bw
        goals.append(
            {
                "goal": f"best clipping >= 70% of copy bandwidth at {big['params']:.0e} parameters",
                "measured": f"{name}: {frac:.0%} ({best['bytes_per_s'] / 1e9:.2f} of {bw / 1e9:.2f} GB/s)",
                "status": "met" if frac >= 0.7 else "not met",
            }
        )
    r["goals"] = goals
    r["notes"] = [
        "Grid: full mode times the default configuration with and without clipping, the other two cells at the default "
        "size, sequence lengths 32-512 and hidden sizes 128-1024 (each around the default, batch 64); not the full cross product.",
        "Clipping above 100% of the copy bandwidth means the gradients (partly) fit in cache, or that an in-place update "
        "skips the read-for-ownership a copy pays; only the largest size measures DRAM.",
        "'Step time with clipping minus without' compares two separate alternately timed runs on a shared machine; "
        "the isolated clip times above are the reliable measure of clipping's share.",
    ]


def write(r: dict, out: Path) -> str:
    """Derived numbers, plots, results.json and results.md from the raw measurements in `r`; returns the markdown."""
    from charclip.benchmarks import report

    _derive(r)
    r["plots"] = report.plots(r, out)
    md = report.markdown(r)
    runfolder.write_file(out / "results.json", json.dumps(r, indent=1, default=float) + "\n")
    runfolder.write_file(out / "results.md", md + "\n")
    return md


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from charclip.cli import fill
    from charclip.jax.device import enable_x64

    enable_x64()  # as every charclip run has it
    from charclip.benchmarks import harness

    o = fill(BenchOptions, args)
    if o.device == "gpu" and not torch.cuda.is_available():
        raise CharclipError(
            "--device gpu: PyTorch sees no CUDA GPU on this machine; use --device cpu"
        )
    if o.torch_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(o.torch_threads)  # child processes inherit it
        torch.set_num_threads(o.torch_threads)
    plan = QUICK if o.quick else FULL
    machine = harness.machine_name(o.device)
    suffix = "-partial" if o.only else "-quick" if o.quick else ""
    out = Path(o.out) if o.out else RESULTS / (machine + suffix)
    out = runfolder.writable_folder(
        out, "--out"
    )  # before the tasks run: an unwritable --out fails now, in one line
    tasks = _tasks(plan, o.device, torch.get_num_threads())
    if o.only:
        tasks = [(name, fn) for name, fn in tasks if any(part in name for part in o.only)]
        if not tasks:
            raise CharclipError(
                f"--only {' '.join(o.only)}: no task matches; the tasks: "
                + ", ".join(n for n, _ in _tasks(plan, o.device, 1))
            )
    mode = ("quick" if o.quick else "full") + (" (partial)" if o.only else "")
    r = {
        "machine": machine,
        "mode": mode,
        "plan": dataclasses.asdict(plan),
        "environment": harness.environment(o.device),
        "torch_threads": torch.get_num_threads(),
        "throughput": [],
        "variants": {},
        "clipping": {"by_size": [], "by_tensors": []},
        "scaling": {},
        "first_step": {},
        "task_seconds": {},
        "notes": [],
    }
    t_start = time.perf_counter()
    with tqdm(tasks, desc="benchmarks", unit="task", file=sys.stderr) as bar:
        for name, fn in bar:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            fn(r)
            r["task_seconds"][name] = time.perf_counter() - t0
    r["total_seconds"] = time.perf_counter() - t_start
    r["loadavg_end"] = list(os.getloadavg())
    try:
        print(write(r, out))
    except OSError as e:
        raise runfolder.os_error(e, f"cannot write the results in {out}") from None
    print(
        f"\nresults: {out}/results.json, results.md and {len(r['plots'])} plots ({r['total_seconds']:.0f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from charclip.cli import HelpFormatter, add_options

    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=HelpFormatter,
    )
    add_options(p, BenchOptions)
    args = p.parse_args(argv)
    try:
        return run(args)
    except CharclipError as e:
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 2

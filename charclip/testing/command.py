"""`charclip conform`: the conformance table of the clippers people use.

Each target runs in its own process (`python -m charclip.testing.targets NAME`), `--jobs`
at a time; the table has one row per target and one column per promise, each cell
"holds" or the dtypes in which the promise fails, followed by every failing row's minimal
counterexample. `--write docs/conformance.md` writes that page (the committed one is
written so, never by hand).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from charclip.errors import CharclipError

SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}

# Rows of docs/divergences.md the kit must find by itself: (row, what, target, promise, dtype).
DIVERGENCES = (
    (
        "1",
        "finite entries whose squares overflow zero the gradient",
        "torch-loop",
        "overflow_safe",
        "float32",
    ),
    ("1", "(optax)", "optax", "overflow_safe", "float32"),
    ("3", "bfloat16 clipped norm above tau", "torch-loop", "norm_at_most_tau", "bfloat16"),
    ("3", "(optax)", "optax", "norm_at_most_tau", "bfloat16"),
    ("5", "float16 squares overflow in optax", "optax", "overflow_safe", "float16"),
    ("6", "tau = 0 with a zero gradient gives NaN in optax", "optax", "tau_zero", "float32"),
    ("7, 8", "negative or NaN tau accepted", "torch-loop", "bad_tau_refused", "float32"),
    ("7, 8", "(optax)", "optax", "bad_tau_refused", "float32"),
    ("12", "optax's clipped norm one ulp above tau", "optax", "norm_at_most_tau", "float32"),
    (
        "13",
        "torch's epsilon changes the factor for small norms",
        "torch-loop",
        "scale_invariant",
        "float32",
    ),
    (
        "14",
        "torch scales a gradient whose norm is exactly tau",
        "torch-loop",
        "identity_below",
        "float32",
    ),
    ("15", "torch's clipping twice shrinks again", "torch-loop", "idempotent", "float32"),
    (
        "J6",
        "charclip's default keeps optax's one-ulp excess",
        "charclip-jax",
        "norm_at_most_tau",
        "float32",
    ),
)


def add_parser(sub) -> None:
    from charclip.cli import (
        HelpFormatter,  # imported here: cli imports this module to register it
    )
    from charclip.testing.targets import TARGETS

    p = sub.add_parser(
        "conform",
        help="which promises the well-known gradient clippers keep (charclip.testing)",
        description="Check gradient-clipping functions (torch, optax, Keras, TensorFlow, charclip's own) against the "
        "conformance kit's promises in every dtype, with Hypothesis, and print the table with each failure's "
        "minimal counterexample. Targets whose library is not installed are listed as skipped.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--target",
        action="append",
        choices=sorted(TARGETS),
        metavar="NAME",
        help=f"a target (repeatable; default: all): {', '.join(TARGETS)}",
    )
    p.add_argument(
        "--max-examples", type=int, default=10, help="Hypothesis examples per promise and dtype"
    )
    p.add_argument(
        "--seed", type=int, help="seed of Hypothesis' search (default: derandomized, reproducible)"
    )
    p.add_argument(
        "--shrink-budget", type=int, default=20, help="calls spent shrinking each failure at most"
    )
    p.add_argument("--jobs", type=int, default=2, help="targets checked at once (one process each)")
    p.add_argument(
        "--write", metavar="PATH", help="write the table as a Markdown page (docs/conformance.md)"
    )
    p.add_argument("--json", metavar="PATH", help="write every report as JSON")
    p.set_defaults(func=_main)


# A divergence the table's run did not meet is looked for again by a run of this many examples of
# just that promise and dtype (what parity_tests' test_the_kit_finds_the_documented_divergences runs),
# so that a small --max-examples keeps the table cheap without hiding what the kit can find.
FOCUSED_EXAMPLES = 25


def _run(name: str, a, only: tuple[str, str] | None = None) -> dict:
    from charclip.testing.targets import TARGETS

    examples, budget = (FOCUSED_EXAMPLES, 0) if only else (a.max_examples, a.shrink_budget)
    cmd = [
        sys.executable,
        "-m",
        "charclip.testing.targets",
        name,
        "--max-examples",
        str(examples),
        "--shrink-budget",
        str(budget),
    ] + (["--seed", str(a.seed)] if a.seed is not None else [])
    if only:
        cmd += ["--promise", only[0], "--dtype", only[1]]
    env = {**os.environ, **dict(TARGETS[name].env)}
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0 or not out.stdout.strip():
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {
            "target": name,
            "title": TARGETS[name].title,
            "skipped": f"the check crashed: {tail}",
            "rows": [],
        }
    d = json.loads(out.stdout.strip().splitlines()[-1])
    d["wall_seconds"] = time.perf_counter() - start
    return d


def _cell(rows: list[dict], promise: str) -> str:
    mine = [r for r in rows if r["promise"] == promise]
    if all(r["verdict"] == "n/a" for r in mine):
        return "n/a"
    failing = [SHORT[r["dtype"]] for r in mine if r["verdict"] == "fails"]
    return "holds" if not failing else "fails " + " ".join(failing)


def _kind(d: dict) -> str:
    from charclip.testing.targets import TARGETS

    return TARGETS[d["target"]].kind


def matrix(reports: list[dict], kind: str = "norm") -> str:
    """One row per target of `kind` ("norm" or "family"), one column per promise."""
    if kind == "family":
        from charclip.testing.family import FAMILY_PROMISES as PROMISES
    else:
        from charclip.testing.promises import PROMISES

    lines = ["| target | " + " | ".join(PROMISES) + " |", "|---" * (len(PROMISES) + 1) + "|"]
    for d in (d for d in reports if _kind(d) == kind):
        cells = (
            ["skipped"] * len(PROMISES)
            if d.get("skipped")
            else [_cell(d["rows"], p) for p in PROMISES]
        )
        lines.append(f"| {d['target']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def failures(reports: list[dict]) -> str:
    from charclip.testing.targets import upstream

    lines = []
    for d in reports:
        lines += ["", f"### {d['target']}: {d['title']}", ""]
        if d.get("skipped"):
            lines.append(f"Skipped: {_esc(d['skipped'])}")
            continue
        bad = [r for r in d["rows"] if r["verdict"] == "fails"]
        if not bad:
            lines.append("Every promise holds in every dtype checked.")
            continue
        lines += [
            "| promise | dtype | minimal counterexample | what happened | upstream |",
            "|---|---|---|---|---|",
        ]
        for r in bad:
            lines.append(
                f"| {r['promise']} | {r['dtype']} | `{_esc(r['counterexample'])}` | {_esc(r['message'])} "
                f"| {upstream(d['target'], r['promise'])} |"
            )
    return "\n".join(lines)


def _fails(d: dict | None, promise: str, dtype: str) -> bool | None:
    if d is None or d.get("skipped"):
        return None
    return any(
        r["promise"] == promise and r["dtype"] == dtype and r["verdict"] == "fails"
        for r in d["rows"]
    )


def rediscovered(
    reports: list[dict], focused: dict[tuple[str, str, str], dict] | None = None
) -> list[tuple[str, str, str, str]]:
    """For each divergence of docs/divergences.md: "yes" (the table's run found it), "yes, in a
    focused run" (FOCUSED_EXAMPLES examples of that promise alone), "NO" or "not run"."""
    by_target = {d["target"]: d for d in reports}
    found = []
    for row, what, target, promise, dtype in DIVERGENCES:
        v = _fails(by_target.get(target), promise, dtype)
        w = _fails((focused or {}).get((target, promise, dtype)), promise, dtype)
        verdict = (
            "not run"
            if v is None
            else "yes"
            if v
            else f"yes, in a focused run ({FOCUSED_EXAMPLES} examples)"
            if w
            else "NO"
        )
        found.append((row, what, f"{target} / {promise} / {dtype}", verdict))
    return found


def focused_runs(reports: list[dict], a) -> dict[tuple[str, str, str], dict]:
    """The divergences the table's run ran but did not meet, each checked again on its own."""
    by_target = {d["target"]: d for d in reports}
    missed = [
        (target, promise, dtype)
        for _, _, target, promise, dtype in DIVERGENCES
        if _fails(by_target.get(target), promise, dtype) is False
    ]
    missed = list(dict.fromkeys(missed))
    with ThreadPoolExecutor(a.jobs) as pool:
        runs = list(pool.map(lambda m: _run(m[0], a, only=(m[1], m[2])), missed))
    return dict(zip(missed, runs))


def page(reports: list[dict], a, seconds: float, focused=None) -> str:
    from importlib import metadata

    from charclip.testing.promises import PROMISES

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    versions = ", ".join(
        f"{p} {version(p)}"
        for p in ("torch", "jax", "optax", "keras", "tensorflow-cpu", "hypothesis")
    )
    seed = "derandomized" if a.seed is None else f"seed {a.seed}"
    lines = [
        "# Conformance of gradient clippers",
        "",
        "Generated by `charclip conform --write docs/conformance.md` (do not edit by hand): every target "
        "below was checked by `charclip.testing.check_clipper` against each promise in float16, bfloat16, "
        f"float32 and float64, {a.max_examples} Hypothesis examples per promise and dtype ({seed}), shrinking "
        f"each failure for up to {a.shrink_budget} calls. {versions}; whole run {seconds:.0f} s.",
        "",
        "The promises (`charclip/testing/promises.py` defines each; `norm_at_most_tau` demands the bound "
        "exactly, measured with the exact oracle):",
        "",
        *[f"- `{p.name}`: {p.says}" for p in PROMISES.values()],
        "",
        "A cell says `holds`, `n/a` (the function returns no norm) or the dtypes in which the promise fails.",
        "",
        matrix(reports),
        "",
        *_family_section(reports),
        "## Divergences of docs/divergences.md, found again by the kit",
        "",
        f"A divergence the table's run ran into is marked yes; one it missed is looked for again by a run "
        f"of {FOCUSED_EXAMPLES} examples of that promise and dtype alone (as the test suite does).",
        "",
        "| row | divergence | target / promise / dtype | found |",
        "|---|---|---|---|",
        *[
            f"| {row} | {what} | {where} | {v} |"
            for row, what, where, v in rediscovered(reports, focused)
        ],
        "",
        "## Minimal counterexamples",
        failures(reports),
        "",
    ]
    return "\n".join(lines)


def _family_section(reports: list[dict]) -> list[str]:
    from charclip.testing.family import FAMILY_DTYPES, FAMILY_PROMISES

    if not any(_kind(d) == "family" for d in reports):
        return []
    return [
        "## The rest of the clipping family",
        "",
        "Adaptive gradient clipping, block RMS and per-example clipping "
        "(docs/clipping-family.md), checked by `charclip.testing.family.check_family` in "
        f"{' and '.join(FAMILY_DTYPES)}, with the same examples and seed. `s` is the rounding "
        "slack, (n + 4) eps for n entries; a unit is a slice along the output axis of the "
        "layout the function reads (torch (out, in, ...), optax (..., in, out)).",
        "",
        *[f"- `{p.name}`: {p.says}" for p in FAMILY_PROMISES.values()],
        "",
        matrix(reports, "family"),
        "",
    ]


def _main(a) -> int:
    from charclip.testing.targets import TARGETS

    for name in ("max_examples", "jobs"):
        if getattr(a, name) < 1:
            raise CharclipError(
                f"--{name.replace('_', '-')} must be 1 or more, got {getattr(a, name)}"
            )
    if a.shrink_budget < 0:
        raise CharclipError(f"--shrink-budget must be 0 or more, got {a.shrink_budget}")
    if a.seed is not None and a.seed < 0:
        raise CharclipError(f"--seed must be zero or more, got {a.seed}")
    names = list(dict.fromkeys(a.target or TARGETS))
    start = time.perf_counter()
    with ThreadPoolExecutor(a.jobs) as pool:
        reports = list(pool.map(lambda n: _run(n, a), names))
    seconds = time.perf_counter() - start
    print(matrix(reports))
    if any(_kind(d) == "family" for d in reports):
        print("\n" + matrix(reports, "family"))
    print(failures(reports))
    print(f"\n{len(names)} targets in {seconds:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(reports, indent=1), encoding="utf-8")
    if a.write:
        focused = focused_runs(reports, a)
        seconds = time.perf_counter() - start
        Path(a.write).write_text(page(reports, a, seconds, focused), encoding="utf-8")
        print(f"wrote {a.write}")
    return 0

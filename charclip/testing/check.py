"""`check_clipper`: run every promise on a clipper, dtype by dtype, and report.

Each (promise, dtype) pair is one Hypothesis property. When it fails, Hypothesis shrinks
the input; the kit records the last failing input Hypothesis ran, which is the minimal
one it replays at the end, and puts it in the row with the promise's message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import hypothesis
from hypothesis import HealthCheck, given

from charclip.testing import adapters
from charclip.testing.promises import (
    NONFINITE,
    PROMISES,
    Broken,
    NotApplicable,
    Options,
    Promise,
)
from charclip.testing.strategies import DTYPES, FRAMEWORKS, np_dtype

VERDICTS = ("holds", "fails", "n/a")


@dataclass(frozen=True)
class Row:
    """One promise in one dtype: `verdict` is "holds", "fails" or "n/a" (not applicable);
    a failing row has the minimal `counterexample` Hypothesis found and the `message`."""

    promise: str
    dtype: str
    verdict: str
    counterexample: str = ""
    message: str = ""
    examples: int = 0

    @property
    def ok(self) -> bool:
        return self.verdict != "fails"


@dataclass(frozen=True)
class Report:
    """The rows of one `check_clipper` run, and what was checked."""

    target: str
    rows: tuple[Row, ...]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every promise holds (or does not apply) in every dtype."""
        return all(r.ok for r in self.rows)

    def ok_except(self, promises: Iterable[str]) -> bool:
        """Every promise holds except those named (promise names, or "name:dtype" for one dtype)."""
        from charclip.testing.family import FAMILY_PROMISES

        skip = set(promises)
        unknown = {s.split(":")[0] for s in skip} - set(PROMISES) - set(FAMILY_PROMISES)
        if unknown:
            raise ValueError(
                f"unknown promises {sorted(unknown)}; the promises are {', '.join(PROMISES)}"
            )
        return all(
            r.ok
            for r in self.rows
            if r.promise not in skip and f"{r.promise}:{r.dtype}" not in skip
        )

    def failing(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "fails"]

    def table(self) -> str:
        """A Markdown table: one row per promise and dtype, the counterexample where it fails."""
        lines = [
            f"{self.target}",
            "",
            "| promise | dtype | verdict | minimal counterexample | what happened |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.promise} | {r.dtype} | {r.verdict} | {_cell(r.counterexample)} | {_cell(r.message)} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "seconds": self.seconds,
            "rows": [asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(d["target"], tuple(Row(**r) for r in d["rows"]), d.get("seconds", 0.0))


def _cell(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text and "`" not in text else text


def clipper_for(fn: Callable, framework: str, adapter: Callable | None = None):
    """The clipper the promises call, for `fn` in `framework` (see `adapters`)."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)} (got {framework!r})")
    if adapter is not None:
        made = adapter(fn)
        return lambda leaves, tau: adapters.output(made(leaves, tau))
    if framework == "torch":
        return adapters.inplace_torch(fn)
    return adapters.functional(fn, framework)


def _first_line(e: BaseException) -> str:
    text = f"{e}" if isinstance(e, Broken) else f"raised {type(e).__name__}: {e}"
    return text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__


class _ShrinkBudgetSpent(BaseException):
    """Stops Hypothesis' shrinker (a BaseException passes through its engine)."""


def run_promise(
    clipper,
    promise: str | Promise,
    dtype: str,
    options: Options,
    max_examples: int,
    seed: int | None,
    shrink_budget: int = 200,
) -> Row:
    """One promise in one dtype, as a Hypothesis property; the minimal failing input if any.

    Shrinking stops after `shrink_budget` more calls once a failure is found (most of a
    check's time is Hypothesis' own); the row then holds the smallest failure found so far.
    """
    p = PROMISES[promise] if isinstance(promise, str) else promise
    promise = p.name
    last: dict = {}
    ran = [0]

    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        report_multiple_bugs=False,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=p.inputs(dtype))
    def prop(case):
        ran[0] += 1
        if "first" in last and ran[0] - last["first"] > shrink_budget:
            raise _ShrinkBudgetSpent
        try:
            p.check(clipper, case, options)
        except NotApplicable:
            last["na"] = True
        except Exception as e:
            last.setdefault("first", ran[0])
            last.update(case=repr(case), message=_first_line(e))
            raise

    if seed is not None:
        prop = hypothesis.seed(seed)(prop)
    try:
        prop()
    except _ShrinkBudgetSpent:
        return Row(promise, dtype, "fails", last["case"], last["message"], ran[0])
    except hypothesis.errors.Unsatisfiable:
        return Row(
            promise,
            dtype,
            "n/a",
            message="no input satisfied the promise's assumptions",
            examples=ran[0],
        )
    except Exception as e:  # noqa: BLE001  (the promise failed; the row says how)
        if "case" not in last:
            return Row(promise, dtype, "fails", "", _first_line(e), ran[0])
        return Row(promise, dtype, "fails", last["case"], last["message"], ran[0])
    if last.get("na"):
        return Row(promise, dtype, "n/a", message="returns no norm", examples=ran[0])
    return Row(promise, dtype, "holds", examples=ran[0])


def check_clipper(
    fn: Callable,
    framework: str = "numpy",
    *,
    dtypes: Iterable[str] = DTYPES,
    promises: Iterable[str] | None = None,
    ulps: float = 0,
    nonfinite: str = "propagate",
    adapter: Callable | None = None,
    max_examples: int = 50,
    seed: int | None = None,
    shrink_budget: int = 200,
    name: str | None = None,
) -> Report:
    """Check a gradient-clipping function against every promise, in every dtype.

    Args:
      fn: the clipper. Without `adapter`: for "numpy"/"jax", `fn(leaves, tau)` returns the
        clipped list (or `(clipped, norm)`); for "torch", `fn(parameters, tau)` clips each
        parameter's `.grad` in place, like `torch.nn.utils.clip_grad_norm_`.
      framework: "numpy", "torch" or "jax" (imported only when asked for).
      dtypes: the gradient dtypes checked ("float16", "bfloat16", "float32", "float64").
      promises: the promise names checked (default: all, see `charclip.testing.PROMISES`).
      ulps: `norm_at_most_tau` allows ||g'|| <= tau (1 + ulps * eps); 0 demands it exactly.
        The other promises' rounding slack grows by the same amount.
      nonfinite: what the clipper promises for a NaN/inf entry: "propagate", "skip", "error".
      adapter: `adapter(fn)` gives a clipper (see `charclip.testing.adapters`).
      max_examples: Hypothesis examples per promise and dtype.
      seed: a seed for reproducible runs (default: Hypothesis' derandomized search).
      shrink_budget: calls spent shrinking a failure at most (then the smallest so far).
      name: the report's title (default: the function's name).

    Returns:
      A `Report`: `.ok`, `.ok_except({...})`, `.table()`, `.rows` (one `Row` per promise
      and dtype, with `promise`, `dtype`, `verdict`, `counterexample`, `message`).
    """
    dtypes = tuple(dtypes)
    for d in dtypes:
        np_dtype(d)
    names = tuple(PROMISES) if promises is None else tuple(promises)
    unknown = sorted(set(names) - set(PROMISES))
    if unknown:
        raise ValueError(f"unknown promises {unknown}; the promises are {', '.join(PROMISES)}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)} (got {nonfinite!r})")
    if not ulps >= 0:
        raise ValueError(f"ulps must be >= 0 (got {ulps})")
    clipper = clipper_for(fn, framework, adapter)
    options = Options(ulps=ulps, nonfinite=nonfinite)
    start = time.perf_counter()
    rows = tuple(
        run_promise(clipper, p, d, options, max_examples, seed, shrink_budget)
        for p in names
        for d in dtypes
    )
    return Report(name or getattr(fn, "__qualname__", repr(fn)), rows, time.perf_counter() - start)

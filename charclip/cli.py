"""The `charclip` command: train, sample and evaluate with either backend.

Further subcommands live in their own modules, listed in COMMANDS; each exposes
`add_parser(subparsers)` (which sets `func`) so this file stays small.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from charclip import __version__, signals
from charclip.config import (
    ClipConfig,
    EvalOptions,
    ModelConfig,
    RunOptions,
    SampleOptions,
    TrainConfig,
    default_of,
    options,
)
from charclip.errors import CharclipError

COMMANDS: tuple[str, ...] = (
    "charclip.parity",
    "charclip.benchmarks.suite",
    "charclip.explode",
    "charclip.testing.command",
)  # modules adding subcommands
GROUPS = (
    "data and output",
    "model",
    "optimisation",
    "clipping",
    "reporting",
    "several devices (docs/distributed.md)",
)


class Parser(argparse.ArgumentParser):
    """argparse, but a mistyped option is one line, `charclip: error: argument --steps: ...`, not a usage block."""

    def error(self, message: str):
        raise CharclipError(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not None, not a flag, not already in the text)."""

    def _get_help_string(self, action):
        if (
            action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
            or ("default" in (action.help or ""))
        ):  # `is`: a default of 0 (== False) is worth showing
            return action.help
        return super()._get_help_string(action)


def _help(f) -> str:
    """A field's help, with its default and what --resume does with it, all from the field's metadata."""
    m = f.metadata
    if m["action"] in ("store_true", "store_const"):
        return m["help"]
    shown = m["shown"] or (
        "none"
        if default_of(f) is None
        else f"{default_of(f):g}"
        if isinstance(default_of(f), float)
        else str(default_of(f))
    )
    rule = "; --resume keeps the run's" if m["resume"] == "kept" else ""
    return f"{m['help']} (default: {shown}{rule})".replace("%", "%%")


def add_options(p: argparse.ArgumentParser, *classes) -> None:
    """One option per field of `classes` that has option metadata (charclip.config.option).

    Every option defaults to None here, so "given" and "left out" stay apart (the resume
    rule needs that); `fill` puts the dataclass defaults in. ClipConfig's three modes are
    mutually exclusive.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive = None
    fields = [(cls, f) for cls in classes for f in options(cls)]
    order = [None, *GROUPS]
    for cls, f in sorted(
        fields, key=lambda cf: order.index(cf[1].metadata["group"])
    ):  # stable: fields keep their order
        m = f.metadata
        target = (
            p
            if m["group"] is None
            else groups.get(m["group"])
            or groups.setdefault(m["group"], p.add_argument_group(m["group"]))
        )
        if cls is ClipConfig and f.name in ("mode", "max_norm", "max_value"):
            exclusive = exclusive or target.add_mutually_exclusive_group()
            target = exclusive
        kwargs = dict(dest=f.name, default=None, help=_help(f))
        if m["action"] in ("store_true", "store_const"):
            kwargs.update(
                action=m["action"],
                **({"const": m["const"]} if m["action"] == "store_const" else {}),
            )
        else:  # a value, or with action "append" several
            metavar = (
                None
                if m["choices"]
                else m["metavar"] or m["flag"].lstrip("-").upper().replace("-", "_")
            )
            kwargs.update(
                type=m["type"] or type(default_of(f)),
                choices=m["choices"],
                metavar=metavar,
                **({"action": m["action"]} if m["action"] else {}),
            )
        target.add_argument(m["flag"], **kwargs)


def fill(cls, a: argparse.Namespace, **fixed):
    """An instance of `cls` from the parsed options: given values, else the fields' defaults."""
    given = {
        f.name: getattr(a, f.name) for f in options(cls) if getattr(a, f.name, None) is not None
    }
    return cls(**{**given, **fixed})


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a char-RNN (default: the embedded Shakespeare)",
        description="Train a character-level RNN with gradient clipping. With no options it trains the default "
        "model on the embedded Shakespeare corpus in a few minutes on a laptop CPU, then prints samples. "
        "Ctrl-C, SIGTERM and SIGHUP finish the current step, write a checkpoint and exit 128 + the signal's number.",
        formatter_class=HelpFormatter,
    )
    add_options(p, RunOptions, ModelConfig, TrainConfig, ClipConfig)
    p.set_defaults(func=_train)


def _clip_config(a) -> ClipConfig:
    mode = a.mode or (
        "value" if a.max_value is not None else "norm"
    )  # a.mode is "none" with --no-clip
    return fill(ClipConfig, a, mode=mode)


def _note_ignored_on_resume(a) -> None:
    """A resumed run keeps its configuration; say which given options that leaves unused."""
    ignored = [
        f.metadata["flag"]
        for cls in (ModelConfig, TrainConfig, ClipConfig)
        for f in options(cls)
        if f.metadata["resume"] == "kept" and getattr(a, f.name) is not None
    ]
    if ignored:
        print(
            f"charclip: note: --resume keeps the run's configuration; ignored: {', '.join(ignored)}",
            file=sys.stderr,
        )


def _compilation_cache(backend: str) -> None:
    """JAX's persistent compilation cache for a CLI run, in <charclip's cache folder>/xla, so a
    second run of a configuration loads its compiled programs instead of compiling them again
    (docs/fast-layer.md). CHARCLIP_COMPILATION_CACHE=off switches it off, a folder puts it
    there; JAX's own JAX_COMPILATION_CACHE_DIR, when set, is left to JAX."""
    import os

    setting = os.environ.get("CHARCLIP_COMPILATION_CACHE", "")
    if backend != "jax" or setting.lower() == "off" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    from charclip import backends, corpus

    folder = setting or (corpus.cache_dir() and corpus.cache_dir() / "xla")
    if folder:  # no usable cache folder: JAX compiles as it would anyway
        backends.module("jax", "device").use_compilation_cache(folder)


def _train(a) -> int:
    from charclip import run
    from charclip.metrics import describe_clipped

    o = fill(RunOptions, a)
    cfg = fill(
        TrainConfig, a, clip=_clip_config(a)
    )  # checks every given option, also those a resume ignores
    model = fill(ModelConfig, a, vocab_size=1)
    if o.resume is not None:
        _note_ignored_on_resume(a)
    o, ck = run.resolve(o)  # the backend and folder a resumed run continues in; the one load
    _compilation_cache(o.backend)
    s = run.launch(model, None if ck is not None and a.steps is None else cfg, o, resumed=ck)
    ran = f"{s['steps_run']} steps" + (
        f" (steps {s['steps'] - s['steps_run'] + 1}-{s['steps']})"
        if s["steps_run"] != s["steps"]
        else ""
    )
    if not s["steps_run"]:
        ran = f"no step (the run was at step {s['steps']}; its closing phase was redone)"
    print(
        f"\ndone: {ran} in {s['seconds']:.0f} s; training loss {_loss(s['train_loss'])}, "
        f"validation loss {_loss(s['val_loss'])} nats/char{_val_batches(s)}; "
        f"{describe_clipped(s['clipped_steps'], s['logged_steps'])}"
        + (f"; {s['skipped_steps']} skipped" if s["skipped_steps"] else "")
    )
    print(
        f"checkpoint: {s['checkpoint']}\nmetrics:    {s['metrics']}"
        + (f"\nplot:       {s['plot']}" if "plot" in s else "")
    )
    if s.get("sample"):
        print("\n--- sample (temperature 0.8) ---" + s["sample"].rstrip() + "\n---")
    return 0


def _loss(x) -> str:
    return "none" if x is None else f"{x:.3f}"


def _val_batches(s: dict) -> str:
    """Which validation loss the closing line shows: --eval-batches batches, not `eval`'s whole
    split."""
    n = s.get("val_batches")
    return f" (first {n} validation batches; `charclip eval` covers the whole split)" if n else ""


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate text from a checkpoint",
        description="Sample text one character at a time from a checkpoint of either backend.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "checkpoint", help="a run folder, a checkpoint folder, or a run's checkpoints/BEST"
    )
    add_options(p, SampleOptions)
    p.set_defaults(func=_sample)


def _sample(a) -> int:
    from charclip import checkpoint
    from charclip.backends import module as backend_module

    o = fill(SampleOptions, a)
    ck = checkpoint.load(a.checkpoint)
    _compilation_cache(o.backend)
    sample = backend_module(o.backend, "sample").sample
    for i in range(o.num_samples):
        if o.num_samples > 1:
            sys.stdout.write(f"--- sample {i + 1} of {o.num_samples} (seed {o.seed + i}) ---\n")
        # Streamed as drawn: a long sample shows progress, and an interrupted one keeps its text.
        text = sample(
            ck.model,
            ck.params,
            ck.vocab,
            o.prime,
            o.length,
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            seed=o.seed + i,
            device=o.device,
            emit=sys.stdout.write,
        )
        sys.stdout.write("" if text.endswith("\n") else "\n")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="loss of a checkpoint on a text, as JSON",
        description="Mean cross-entropy (nats/char) of a checkpoint on a text file, or on the validation "
        "split of the corpus it was trained on, whole (the validation loss training "
        "reports covers only its first --eval-batches batches, so the two differ). "
        "Prints JSON; a loss that is not finite prints as null.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "checkpoint", help="a run folder, a checkpoint folder, or a run's checkpoints/BEST"
    )
    add_options(p, EvalOptions)
    p.set_defaults(func=_eval)


def _eval(a) -> int:
    import math

    from charclip import checkpoint, corpus
    from charclip.backends import module as backend_module
    from charclip.batching import Streams, split

    o = fill(EvalOptions, a)
    ck = checkpoint.load(a.checkpoint)
    cfg = ck.train
    if o.data is not None:
        tokens = ck.vocab.encode(corpus.read_text(o.data), what=f"the text {o.data}")
    else:
        text = corpus.load(ck.corpus.get("path"))
        if corpus.fingerprint(text) != ck.corpus.get("sha256_16"):
            print(
                "charclip: note: the corpus has changed since this checkpoint was trained; "
                "the loss is on its current validation split",
                file=sys.stderr,
            )
        tokens = split(ck.vocab.encode(text, what="the training corpus"), cfg.val_fraction)[1]
    need = 2 * cfg.seq_len + 1  # one stream of one sequence, with room for the targets' shift
    if len(tokens) < need:
        what = (
            f"the text {o.data}"
            if o.data is not None
            else "the validation split of the checkpoint's corpus"
        )
        raise CharclipError(
            f"{what} has {len(tokens)} characters; eval needs at least {need} (twice the checkpoint's "
            f"sequence length {cfg.seq_len}, plus one): give a longer text with --data"
        )
    batch = max(1, min(cfg.batch_size, (len(tokens) - cfg.seq_len) // (cfg.seq_len + 1)))
    streams = Streams(tokens, batch, cfg.seq_len, what="evaluation text")
    _compilation_cache(o.backend)
    trainer = backend_module(o.backend, "train").Trainer(ck.model, cfg, ck.params, device=o.device)
    loss = trainer.evaluate(streams.eval_batches(streams.batches_per_epoch))
    if not math.isfinite(loss):  # JSON has no NaN: null, and a word on stderr
        print(
            f"charclip: note: the loss is {loss} (the checkpoint's parameters are not all finite); printed as null",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "loss": loss if math.isfinite(loss) else None,
                "unit": "nats/char",
                "characters": streams.batches_per_epoch * batch * cfg.seq_len,
                "checkpoint": str(ck.path),
                "step": ck.step,
                "backend": o.backend,
                "data": o.data or "validation split",
                "batches": streams.batches_per_epoch,
            },
            allow_nan=False,
        )
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="charclip",
        description="A character-level RNN with gradient clipping, written twice (PyTorch and JAX) and proven equal.",
    )
    p.add_argument("--version", action="version", version=f"charclip {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    previous = (
        signals.install()
    )  # SIGTERM and SIGHUP stop like Ctrl-C, from the start (the loop defers them)
    try:
        args = parser().parse_args(argv)
        return args.func(args)
    except CharclipError as e:
        print(f"charclip: error: {_printable(str(e))}", file=sys.stderr)
        return 2
    except (
        KeyboardInterrupt
    ) as e:  # outside the loop, or a second signal: checkpoints on disk are whole
        print(f"charclip: interrupted ({signal_name(e)})", file=sys.stderr)
        return signals.exit_code(e)
    finally:
        signals.restore(previous)


def _printable(message: str) -> str:
    """One line any console prints: a path's undecodable bytes (surrogate escapes) as \\xNN, no line breaks."""
    text = message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return " ".join(text.splitlines())


def signal_name(e: KeyboardInterrupt) -> str:
    import signal

    return signal.Signals(signals.exit_code(e) - 128).name


if __name__ == "__main__":
    sys.exit(main())

"""The `charclip` command: train, sample and evaluate with either backend.

Further subcommands live in their own modules, listed in COMMANDS; each exposes
`add_parser(subparsers)` (which sets `func`) so this file stays small.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from charclip import __version__
from charclip.config import CELLS, DTYPES, NONFINITE, ClipConfig, ModelConfig, TrainConfig
from charclip.errors import CharclipError

COMMANDS: tuple[str, ...] = ("charclip.parity", "benchmarks.suite", "charclip.explode")  # modules adding subcommands

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not None, not a flag, not already in the text)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


_D = TrainConfig()
_M = ModelConfig(vocab_size=1)


def _backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("torch", "jax"), default="torch", help="framework to run in")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where to run")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a char-RNN (default: the embedded Shakespeare)",
        description="Train a character-level RNN with gradient clipping. With no options it trains the default "
        "model on the embedded Shakespeare corpus in a few minutes on a laptop CPU, then prints samples.",
        formatter_class=HelpFormatter,
    )
    _backend_args(p)
    p.set_defaults(backend=None)  # resolved in _train: the checkpoint's backend on --resume, else torch
    g = p.add_argument_group("data and output")
    g.add_argument("--data", metavar="PATH", help="UTF-8 text file to train on (default: embedded Shakespeare)")
    g.add_argument("--out", metavar="DIR", help="run folder for checkpoints, metrics and plots (default: runs/<backend>-<time>)")
    g.add_argument("--resume", metavar="RUN", help="continue the run saved in RUN (its configuration is kept; --steps may extend it)")
    g.add_argument("--val-fraction", type=float, default=_D.val_fraction, help="share of the text kept for validation, at its end")
    g = p.add_argument_group("model")
    g.add_argument("--cell", choices=CELLS, default=_M.cell)
    g.add_argument("--layers", type=int, default=_M.num_layers)
    g.add_argument("--hidden", type=int, default=_M.hidden_size, help="hidden units per layer")
    g.add_argument("--embed", type=int, default=_M.embedding_dim, help="embedding size")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help=f"training steps (default: {_D.steps}; with --resume, the checkpoint's)")
    g.add_argument("--batch-size", type=int, default=_D.batch_size, help="parallel streams per batch")
    g.add_argument("--seq-len", type=int, default=_D.seq_len, help="truncated-BPTT length")
    g.add_argument("--lr", type=float, default=_D.lr, help="Adam learning rate")
    g.add_argument("--seed", type=int, default=_D.seed)
    g.add_argument("--dtype", choices=DTYPES, default=_D.dtype)
    g = p.add_argument_group("clipping")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--clip-norm", type=float, metavar="TAU", default=None, help=f"clip the global L2 norm to TAU (the default, TAU={ClipConfig().max_norm:g})")
    c.add_argument("--clip-value", type=float, metavar="V", default=None, help="clamp every gradient component to [-V, V]")
    c.add_argument("--no-clip", action="store_true", help="do not clip")
    g.add_argument("--clip-impl", choices=("library", "reference"), default="library",
                   help="library: torch clip_grad_norm_ / optax.clip_by_global_norm; reference: charclip's own")
    g.add_argument("--nonfinite", choices=NONFINITE, default=_D.nonfinite,
                   help="a step with a NaN/inf loss or gradient: stop with a checkpoint, skip it, or apply it anyway")
    g = p.add_argument_group("reporting")
    g.add_argument("--eval-every", type=int, default=_D.eval_every, help="steps between validation losses")
    g.add_argument("--eval-batches", type=int, default=_D.eval_batches, help="validation batches per evaluation")
    g.add_argument("--checkpoint-every", type=int, default=_D.checkpoint_every)
    g.add_argument("--sample-chars", type=int, default=400, help="characters sampled at the end (0: none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("several devices (docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=1, help="torch: processes, the global batch split between them")
    g.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="torch: replicated (DDP) or sharded (FSDP2) parameters")
    g.add_argument("--devices", type=int, default=1, help="jax: devices in the mesh (virtual ones on the CPU)")
    g.add_argument("--mesh", choices=("data", "model", "fsdp", "2d", "shard_map"), default="data",
                   help="jax: shard the batch, the parameters, both on one axis, both on two axes, or fsdp by hand")
    p.set_defaults(func=_train)


def _run_dir(resume: str) -> str:
    """The run folder of a --resume path, so that resuming from a step folder writes beside it, not inside it."""
    p = Path(resume)
    if (p / "checkpoint.json").is_file() and p.parent.name == "checkpoints":
        return str(p.parent.parent)
    return str(p.parent) if p.name == "checkpoints" else resume


def _check_seed(seed: int) -> None:
    if seed < 0:  # NumPy's generators take only non-negative seeds
        raise CharclipError(f"--seed must be zero or more, got {seed}")


def _clip_config(a) -> ClipConfig:
    if a.no_clip:
        return ClipConfig(mode="none", impl=a.clip_impl)
    if a.clip_value is not None:
        return ClipConfig(mode="value", max_value=a.clip_value, impl=a.clip_impl)
    return ClipConfig(mode="norm", max_norm=ClipConfig().max_norm if a.clip_norm is None else a.clip_norm, impl=a.clip_impl)


_KEPT_ON_RESUME = ("cell", "layers", "hidden", "embed", "batch_size", "seq_len", "lr", "seed", "dtype", "val_fraction",
                   "clip_norm", "clip_value", "no_clip", "clip_impl", "nonfinite", "eval_every", "eval_batches",
                   "checkpoint_every")


def _note_ignored_on_resume(a) -> None:
    """A resumed run keeps its configuration; say which given options that leaves unused."""
    defaults = parser().parse_args(["train"])
    ignored = [f"--{k.replace('_', '-')}" for k in _KEPT_ON_RESUME if getattr(a, k) != getattr(defaults, k)]
    if ignored:
        print(f"charclip: note: --resume keeps the run's configuration; ignored: {', '.join(ignored)}", file=sys.stderr)


def _train(a) -> int:
    import time

    from charclip import backends, run

    cfg = TrainConfig(
        steps=_D.steps if a.steps is None else a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, seed=a.seed, dtype=a.dtype,
        val_fraction=a.val_fraction, eval_every=a.eval_every, eval_batches=a.eval_batches,
        checkpoint_every=a.checkpoint_every, nonfinite=a.nonfinite, clip=_clip_config(a),
    )
    model = ModelConfig(vocab_size=1, cell=a.cell, hidden_size=a.hidden, num_layers=a.layers, embedding_dim=a.embed)
    if a.sample_chars < 0:
        raise CharclipError(f"--sample-chars must be zero or more, got {a.sample_chars}")
    _check_seed(a.seed)
    if a.resume:
        _note_ignored_on_resume(a)
    if a.backend is None:  # a resumed run continues in the backend that wrote it, unless told otherwise
        from charclip import checkpoint

        a.backend = checkpoint.load(a.resume).backend if a.resume else "torch"
    out = a.out or (_run_dir(a.resume) if a.resume else None) or f"runs/{a.backend}-{time.strftime('%Y%m%d-%H%M%S')}"
    world, layout, other = (a.nproc, a.parallel, a.devices) if a.backend == "torch" else (a.devices, a.mesh, a.nproc)
    if other != 1:
        raise CharclipError("--nproc is for --backend torch and --devices for --backend jax")
    launch = backends.launcher(a.backend, world, layout if world > 1 else None)
    s = launch(run.train, model, None if a.resume and a.steps is None else cfg, backend=a.backend, out_dir=out, data_path=a.data, resume=a.resume,
              device=a.device, progress=not a.no_progress, sample_chars=a.sample_chars)
    print(f"\ndone: {s['steps']} steps in {s['seconds']:.0f} s; training loss {s['train_loss']:.3f}, "
          f"validation loss {s['val_loss']:.3f} nats/char; {s['clipped_fraction']:.1%} of steps clipped"
          + (f"; {s['skipped_steps']} skipped" if s["skipped_steps"] else ""))
    print(f"checkpoint: {s['checkpoint']}\nmetrics:    {s['metrics']}" + (f"\nplot:       {s['plot']}" if "plot" in s else ""))
    if s.get("sample"):
        print("\n--- sample (temperature 0.8) ---" + s["sample"].rstrip() + "\n---")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint",
                       description="Sample text one character at a time from a checkpoint of either backend.",
                       formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a run folder or a checkpoint folder")
    _backend_args(p)
    p.add_argument("--prime", default="\n", help="text to start from (its characters must be in the vocabulary)")
    p.add_argument("--length", type=int, default=500, help="characters to generate after the prime")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest characters only")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_sample)


def _sample(a) -> int:
    from charclip import checkpoint
    from charclip.backends import module as backend_module

    _check_seed(a.seed)
    ck = checkpoint.load(a.checkpoint)
    text = backend_module(a.backend, "sample").sample(
        ck.model, ck.params, ck.vocab, a.prime, a.length, temperature=a.temperature, top_k=a.top_k, seed=a.seed, device=a.device
    )
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss of a checkpoint on a text, as JSON",
                       description="Mean cross-entropy (nats/char) of a checkpoint on a text file, or on the validation "
                       "split of the corpus it was trained on. Prints JSON.")
    p.add_argument("checkpoint", help="a run folder or a checkpoint folder")
    _backend_args(p)
    p.add_argument("--data", metavar="PATH", help="text to evaluate, whole (default: the training corpus's validation split)")
    p.set_defaults(func=_eval)


def _eval(a) -> int:
    from charclip import checkpoint, corpus
    from charclip.batching import Streams, split
    from charclip.backends import module as backend_module

    ck = checkpoint.load(a.checkpoint)
    cfg = ck.train
    if a.data is not None:
        tokens = ck.vocab.encode(corpus.read_text(a.data), what=f"the text {a.data}")
    else:
        text = corpus.load(ck.corpus.get("path"))
        if corpus.fingerprint(text) != ck.corpus.get("sha256_16"):
            print("charclip: note: the corpus has changed since this checkpoint was trained; "
                  "the loss is on its current validation split", file=sys.stderr)
        tokens = split(ck.vocab.encode(text, what="the training corpus"), cfg.val_fraction)[1]
    batch = max(1, min(cfg.batch_size, (len(tokens) - cfg.seq_len) // (cfg.seq_len + 1)))
    streams = Streams(tokens, batch, cfg.seq_len, what="evaluation text")
    trainer = backend_module(a.backend, "train").Trainer(ck.model, cfg, ck.params, device=a.device)
    loss = trainer.evaluate(streams.eval_batches(streams.batches_per_epoch))
    print(json.dumps({"loss": loss, "unit": "nats/char", "characters": streams.batches_per_epoch * batch * cfg.seq_len,
                      "checkpoint": str(ck.path), "step": ck.step, "backend": a.backend, "data": a.data or "validation split"}))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CharclipError as e:
        print(f"charclip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("charclip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

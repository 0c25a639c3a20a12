"""Training-step benchmarks: throughput of both backends, variants, scaling, memory, first step.

Every torch/JAX comparison builds the Trainers from the same initial weights and feeds
them the same batches of the embedded Shakespeare, timing their `.step` alternately;
"jax" is the JAX Trainer as training runs it (the fast layer), "jax_scan" the same
Trainer on the `lax.scan` reference layer.
A JAX step returns only after `float()` of its loss and norm (as the run loop does),
a torch step after `.item()`: both measurements end with the work done.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from charclip.benchmarks.harness import interleaved, paired_ratio, stats, timed
from charclip.config import GATES, ClipConfig, ModelConfig, TrainConfig

CORPUS_CHARS = 2_000_000  # enough for 512 x 64 x several batches, quick to encode


@dataclass(frozen=True)
class Case:
    """One training configuration: the model and batch shape, and whether norm clipping is on."""

    cell: str
    hidden: int
    layers: int
    embed: int
    batch: int
    seq: int
    clip: bool = True

    @classmethod
    def default(cls, **changes) -> Case:
        """The `charclip train` defaults, read from the dataclasses at run time."""
        m, t = ModelConfig(vocab_size=1), TrainConfig()
        base = cls(
            m.cell,
            m.hidden_size,
            m.num_layers,
            m.embedding_dim,
            t.batch_size,
            t.seq_len,
            t.clip.mode == "norm",
        )
        return dataclasses.replace(base, **changes)

    def configs(self, vocab_size: int) -> tuple[ModelConfig, TrainConfig]:
        model = ModelConfig(
            vocab_size=vocab_size,
            cell=self.cell,
            hidden_size=self.hidden,
            num_layers=self.layers,
            embedding_dim=self.embed,
        )
        train = TrainConfig(
            batch_size=self.batch,
            seq_len=self.seq,
            clip=ClipConfig() if self.clip else ClipConfig(mode="none"),
        )
        return model, train

    @property
    def label(self) -> str:
        return f"{self.cell} {self.layers}x{self.hidden} T={self.seq} B={self.batch}" + (
            "" if self.clip else " no-clip"
        )


@functools.cache
def tokens() -> tuple[np.ndarray, int]:
    """Token ids of the start of the embedded corpus, and the vocabulary size."""
    from charclip import corpus
    from charclip.vocab import Vocab

    text = corpus.load(None)
    vocab = Vocab.from_text(text)
    return vocab.encode(text[:CORPUS_CHARS]), len(vocab)


def batches(case: Case, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from charclip.batching import Position, Streams

    streams = Streams(tokens()[0], case.batch, case.seq, what="benchmark text")
    out, pos = [], Position()
    for _ in range(n):
        x, y = streams.batch(0, pos)
        out.append((np.ascontiguousarray(x), np.ascontiguousarray(y)))
        pos = streams.next(pos)
    return out


class Feeder:
    """Calls `step(x, y)` on the next batch of a fixed list each time it is called."""

    def __init__(self, step, data):
        self.step, self.data, self.i = step, data, 0

    def __call__(self):
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        return self.step(x, y)


def trainers(case: Case, device: str, backends=("torch", "jax")):
    """Trainers of the named backends for `case`, all from the same initial weights.

    "jax" is the JAX Trainer as training uses it (the fast layer); "jax_scan" is the JAX
    Trainer on the `lax.scan` reference layer.
    """
    from charclip.backends import module as backend_module
    from charclip.weights import init_params

    model, train = case.configs(tokens()[1])
    params = init_params(model, 0, train.dtype)
    out = {}
    for b in backends:
        if b == "jax_scan":
            out[b] = backend_module("jax", "train").Trainer(
                model, train, params, device=device, layer="scan"
            )
        else:
            out[b] = backend_module(b, "train").Trainer(model, train, params, device=device)
    return out


def step_flops(case: Case, vocab_size: int) -> dict:
    """Matmul FLOPs of one training step, by formula (XLA's cost_analysis counts a loop body once).

    Forward, per layer: the input projection 2 T B K G and the recurrence 2 T B H G
    (G = gates x H, K = the layer's input width), plus the head 2 T B H V. Backward: twice
    the forward (each product has a gradient for each of its two operands). The count is
    the model's, the same for both backends: a backend that skips work (JAX's lookup table
    for layer 0) gets credit for the time it saves, not for fewer FLOPs.
    """
    g = GATES[case.cell] * case.hidden
    rows = case.batch * case.seq
    fwd = sum(
        2 * rows * ((case.embed if k == 0 else case.hidden) + case.hidden) * g
        for k in range(case.layers)
    )
    fwd += 2 * rows * case.hidden * vocab_size
    return {"forward": fwd, "step": 3 * fwd}


def sgemm_peak(device: str, repeats: int, n: int = 1024) -> dict:
    """The best float32 matmul rate (FLOP/s) of each framework on square n x n operands: the roofline's ceiling."""
    import jax
    import jax.numpy as jnp
    import torch

    from charclip.jax.device import resolve as device_of

    dev = "cuda" if device == "gpu" else "cpu"
    a = torch.randn(n, n, device=dev)
    ja = jax.device_put(jnp.asarray(a.cpu().numpy()), device_of(device))
    jdot = jax.jit(lambda x: x @ x)

    def torch_mm():
        out = a @ a
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    res = interleaved(
        {"torch.mm": torch_mm, "jnp.dot (jit)": lambda: jdot(ja).block_until_ready()},
        repeats=max(repeats, 5) * 4,
        warmup=2,
    )
    flop = 2 * n**3
    impls = {
        k: {**v, "flop_per_s": flop / v["min"]} for k, v in res.items()
    }  # best: the ceiling, not the typical
    return {"n": n, "impls": impls, "peak_flop_per_s": max(v["flop_per_s"] for v in impls.values())}


def throughput(case: Case, *, device: str, repeats: int, memory: bool = False) -> dict:
    """One full training step of torch, JAX (fast layer) and JAX (scan), timed alternately; plus each one's first step."""
    data = batches(case, 4)
    first = {}
    load_start = os.getloadavg()[0]
    tr = trainers(case, device, ("torch", "jax", "jax_scan"))
    for name, t in tr.items():
        first[name] = timed(lambda t=t: t.step(*data[0]))[
            1
        ]  # JAX: trace + compile + run; torch: warm-up
    res = interleaved(
        {name: Feeder(t.step, data) for name, t in tr.items()}, repeats=repeats, warmup=1
    )
    chars = case.batch * case.seq
    flops = step_flops(case, tokens()[1])["step"]
    out = {
        "case": dataclasses.asdict(case),
        "label": case.label,
        "first_step_s": first,
        "step_flop": flops,
        "loadavg": [load_start, os.getloadavg()[0]],
    }
    for name, s in res.items():
        out[name] = {**s, "chars_per_s": chars / s["median"], "flop_per_s": flops / s["median"]}
    # Paired, round by round: torch's time over JAX's (> 1: JAX is faster).
    out["jax_over_torch"] = paired_ratio(res["torch"], res["jax"])["median"]
    out["ratios"] = {
        "jax": paired_ratio(res["torch"], res["jax"]),
        "jax_scan": paired_ratio(res["torch"], res["jax_scan"]),
    }
    if memory:
        out["memory"] = {
            "torch_saved_for_backward_bytes": torch_saved_bytes(tr["torch"], data[0]),
            "jax": jax_memory(tr["jax"], data[0]),
        }
    return out


# ---------------------------------------------------------------- JAX variants


class JaxStepper:
    """Holds the state around a jitted step (params, opt_state, state, x, y, lr) -> (..., metrics), like the Trainer."""

    def __init__(self, trainer, step_fn):
        self.t, self.fn = trainer, step_fn
        self.params, self.opt, self.state = (
            trainer.params,
            trainer.opt_state,
            trainer._hidden_for(trainer.cfg.batch_size),
        )

    def __call__(self, x, y):
        self.params, self.opt, self.state, m = self.fn(
            self.params, self.opt, self.state, x, y, self.t.cfg.lr
        )
        return float(m["loss"]), float(m["grad_norm"])


def jax_variants(case: Case, *, device: str, repeats: int, unrolls: tuple[int, ...]) -> dict:
    """The recurrent layers (`charclip.jax.model.LAYERS`) and the scans' `unroll`, all timed alternately."""
    from charclip.jax import model as M
    from charclip.jax.train import make_train_step

    t = trainers(case, device, ("jax",))["jax"]
    data = batches(case, 4)
    names = {
        "fast": "fast layer (default)",
        "fast-no-table": "fast layer, layer 0 projected (no table)",
        "scan": "lax.scan reference (autodiff)",
    }
    steppers = {
        names[layer]: JaxStepper(t, make_train_step(t.model_cfg, t.cfg, t.tx, layer=layer))
        for layer in M.LAYERS
    }
    for u in unrolls:
        steppers[f"fast layer, unroll={u}"] = JaxStepper(
            t, make_train_step(t.model_cfg, t.cfg, t.tx, unroll=u)
        )
        steppers[f"scan, unroll={u}"] = JaxStepper(
            t, make_train_step(t.model_cfg, t.cfg, t.tx, layer="scan", unroll=u)
        )
    compile_s = {name: timed(lambda s=s: s(*data[0]))[1] for name, s in steppers.items()}
    load_start = os.getloadavg()[0]
    res = interleaved(
        {name: Feeder(s, data) for name, s in steppers.items()}, repeats=repeats, warmup=1
    )
    chars = case.batch * case.seq
    return {
        "case": dataclasses.asdict(case),
        "label": case.label,
        "loadavg": [load_start, os.getloadavg()[0]],
        "variants": {
            n: {**s, "chars_per_s": chars / s["median"], "first_step_s": compile_s[n]}
            for n, s in res.items()
        },
    }


def torch_table(case: Case, *, device: str, repeats: int) -> dict:
    """Layer 0's input projection in torch, forward and backward: per row, as nn.RNN/LSTM/GRU
    compute it (embedding rows, then x W_ih0^T + b), vs as a table (V rows, then gathered).

    torch's recurrent modules take the embedded input and project it inside their own
    kernel, so a table cannot be handed to them: the difference measured here is what a
    torch model giving up nn.LSTM for a hand-written loop could at most save.
    """
    import torch

    dev = "cuda" if device == "gpu" else "cpu"
    model, _ = case.configs(tokens()[1])
    g = GATES[case.cell] * case.hidden
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(model.vocab_size, case.embed, generator=gen).to(dev).requires_grad_()
    w = (torch.randn(g, case.embed, generator=gen) * 0.06).to(dev).requires_grad_()
    b = torch.zeros(g, device=dev, requires_grad=True)
    x = torch.from_numpy(batches(case, 1)[0][0]).to(dev)
    d_out = torch.randn(case.batch, case.seq, g, generator=gen).to(dev)

    def run(project):
        def go():
            emb.grad = w.grad = b.grad = None
            project().backward(d_out)
            if dev == "cuda":
                torch.cuda.synchronize()

        return go

    res = interleaved(
        {
            "per row: embedding[x] @ W_ih0^T + b": run(lambda: emb[x] @ w.T + b),
            "table: (embedding @ W_ih0^T + b)[x]": run(lambda: (emb @ w.T + b)[x]),
        },
        repeats=max(repeats, 5) * 2,
        warmup=2,
    )
    return {"case": dataclasses.asdict(case), "label": case.label, "variants": res}


# ---------------------------------------------------------------- torch variants


def torch_threads(case: Case, *, device: str, repeats: int) -> dict:
    """The torch step with 1 and with 2 intra-op threads, alternately (one untimed step after each switch)."""
    import torch

    saved = torch.get_num_threads()
    t = trainers(case, device, ("torch",))["torch"]
    data = batches(case, 4)
    feed = Feeder(t.step, data)
    samples: dict[str, list[float]] = {"1 thread": [], "2 threads": []}
    try:
        feed(), feed()
        for r in range(repeats):
            for name, n in (("1 thread", 1), ("2 threads", 2))[:: 1 if r % 2 == 0 else -1]:
                torch.set_num_threads(n)
                feed()  # untimed: the first step after a switch resizes the pool
                samples[name].append(timed(feed)[1])
    finally:
        torch.set_num_threads(saved)
    chars = case.batch * case.seq
    return {
        "case": dataclasses.asdict(case),
        "label": case.label,
        "variants": {
            n: {**stats(s), "chars_per_s": chars / stats(s)["median"]} for n, s in samples.items()
        },
    }


def torch_compile(case: Case, *, device: str, repeats: int) -> dict:
    """Eager vs `torch.compile` of the model (forward and backward), alternately; compile time apart."""
    import torch

    tr = trainers(case, device, ("torch",))
    eager = tr["torch"]
    compiled = trainers(case, device, ("torch",))["torch"]
    compiled.model = torch.compile(compiled.model)
    data = batches(case, 4)
    out = {"case": dataclasses.asdict(case), "label": case.label}
    try:
        # Two steps: the first has no hidden state, the second has one, and each compiles its own graph.
        _, c1 = timed(lambda: compiled.step(*data[0]))
        _, c2 = timed(lambda: compiled.step(*data[1]))
    except (
        Exception
    ) as e:  # inductor needs a working C++ compiler; report instead of failing the whole run
        return {
            **out,
            "skipped": f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
        }
    res = interleaved(
        {"eager": Feeder(eager.step, data), "torch.compile": Feeder(compiled.step, data)},
        repeats=repeats,
        warmup=2,
    )
    chars = case.batch * case.seq
    out["compile_s"] = c1 + c2
    out["variants"] = {n: {**s, "chars_per_s": chars / s["median"]} for n, s in res.items()}
    return out


def cudnn(case: Case, *, device: str, repeats: int) -> dict:
    """On a GPU: torch with cuDNN's fused RNN vs without (ATen's own kernels), alternately."""
    import torch

    out = {"case": dataclasses.asdict(case), "label": case.label}
    if device != "gpu" or not torch.cuda.is_available():
        return {**out, "skipped": "needs --device gpu and a CUDA GPU"}
    t = trainers(case, device, ("torch",))["torch"]
    data = batches(case, 4)
    feed = Feeder(t.step, data)

    def with_cudnn(flag):
        def run():
            with torch.backends.cudnn.flags(enabled=flag):
                return feed()

        return run

    res = interleaved(
        {"cuDNN": with_cudnn(True), "no cuDNN": with_cudnn(False)}, repeats=repeats, warmup=2
    )
    chars = case.batch * case.seq
    return {
        **out,
        "variants": {n: {**s, "chars_per_s": chars / s["median"]} for n, s in res.items()},
    }


# ---------------------------------------------------------------- memory and first step


def torch_saved_bytes(trainer, batch) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward pass (activation memory)."""
    import torch

    from charclip.torch import model as torch_model

    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = torch_model.loss(trainer.model, *batch, None)
    del loss
    return sum(seen.values())


def jax_memory(trainer, batch) -> dict | None:
    """XLA's compiled memory analysis of a JAX Trainer's step (cached after its first step): bytes."""
    x, y = batch
    compiled = trainer.train_step.lower(
        trainer.params, trainer.opt_state, trainer._hidden_for(len(x)), x, y, trainer.cfg.lr
    ).compile()
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend / version implements it
        return None
    if m is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
    )
    out = {f: int(getattr(m, f, 0)) for f in fields}
    out["peak_estimate_bytes"] = (
        out["argument_size_in_bytes"]
        + out["output_size_in_bytes"]
        + out["temp_size_in_bytes"]
        - out["alias_size_in_bytes"]
    )
    return out


_RSS_CHILD = r"""
import json, sys
import torch
torch.set_num_threads({threads})
from charclip.benchmarks.training import Case, batches, trainers
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
out = []
for seq in {seqs}:  # increasing: the high-water mark after a step is this length's peak
    case = Case(**{{**{case}, "seq": seq}})
    data = batches(case, 2)
    t = trainers(case, "cpu", ("torch",))["torch"]
    before = rss()
    t.step(*data[0]); t.step(*data[1])
    out.append({{"seq": seq, "peak_rss_bytes": hwm(), "rss_before_bytes": before}})
    del t
print(json.dumps(out))
"""


def torch_rss(case: Case, seqs: list[int], threads: int) -> list[dict] | dict:
    """Peak resident memory of a fresh torch process training at increasing sequence lengths."""
    code = _RSS_CHILD.format(threads=threads, seqs=sorted(seqs), case=dataclasses.asdict(case))
    return _child(code)


_FIRST_STEP_CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
{setup}
from charclip.benchmarks.training import Case, batches, trainers
t1 = time.perf_counter()
case = Case(**{case})
data = batches(case, 2)
t2 = time.perf_counter()
tr = trainers(case, "{device}", ("{backend}",))["{backend}"]
t3 = time.perf_counter()
tr.step(*data[0])
t4 = time.perf_counter()
tr.step(*data[1])
t5 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "build_s": t3 - t2, "first_step_s": t4 - t3, "second_step_s": t5 - t4,
                  "to_first_step_s": (t1 - t0) + (t4 - t2) }}))
"""


def first_step_fresh(case: Case, backend: str, device: str, torch_threads_n: int) -> dict:
    """A fresh process: import, build the trainer, first step, second step (seconds)."""
    setup = (
        f"import torch; torch.set_num_threads({torch_threads_n})"
        if backend == "torch"
        else "from charclip.jax.device import enable_x64; enable_x64()"
    )
    return _child(
        _FIRST_STEP_CHILD.format(
            setup=setup, case=dataclasses.asdict(case), device=device, backend=backend
        )
    )


def jax_compile_split(case: Case, device: str) -> dict:
    """Trace+lower time and XLA compile time of the JAX train step, for a fresh jit."""
    from charclip.jax.train import make_train_step

    t = trainers(case, device, ("jax",))["jax"]
    x, y = batches(case, 1)[0]
    step = make_train_step(t.model_cfg, t.cfg, t.tx)
    lowered, lower_s = timed(
        lambda: step.lower(t.params, t.opt_state, t._hidden_for(case.batch), x, y, t.cfg.lr)
    )
    _, compile_s = timed(lambda: lowered.compile())
    return {"trace_lower_s": lower_s, "compile_s": compile_s}


_CHILD_ENV_KEEP = ("PATH", "HOME", "LANG", "XLA_FLAGS", "PYTHONPATH", "TMPDIR", "CI")


def _child(code: str, extra_env: dict | None = None, timeout: float = 300) -> dict | list:
    """Run `code` in a fresh Python from the repository root; its last stdout line is JSON."""
    env = {**os.environ, **(extra_env or {})}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=root,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {
            "skipped": f"child failed: {p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else p.returncode}"
        }
    return json.loads(p.stdout.strip().splitlines()[-1])


_XLA_THREADS_CHILD = r"""
import json, sys
import torch
torch.set_num_threads({threads})
from charclip.jax.device import enable_x64
enable_x64()
from charclip.benchmarks.training import Case, throughput
print(json.dumps(throughput(Case(**{case}), device="cpu", repeats={repeats})))
"""

XLA_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def jax_single_thread(case: Case, *, repeats: int, torch_threads_n: int) -> dict:
    """The torch/JAX throughput comparison again, in a fresh process whose XLA runs on one thread."""
    flags = (os.environ.get("XLA_FLAGS", "") + " " + XLA_SINGLE_THREAD).strip()
    code = _XLA_THREADS_CHILD.format(
        threads=torch_threads_n, case=dataclasses.asdict(case), repeats=repeats
    )
    res = _child(code, {"XLA_FLAGS": flags})
    return {**res, "XLA_FLAGS": flags} if isinstance(res, dict) else res

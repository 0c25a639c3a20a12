"""The temporal-order task of Pascanu, Mikolov & Bengio (2013) at a tiny size: with a learning rate
too large for plain SGD, the unclipped run diverges and fails, the clipped one solves the task by
the paper's criterion (under 1% wrong on fresh sequences). Fixed seeds; JAX (the backends' updates
agree to rounding, parity_tests/parity/test_paper_backends.py)."""

from __future__ import annotations

from dataclasses import replace

from charclip.explode.paper import SMALL, temporal_order_run

TINY = replace(SMALL, test_size=1000, max_updates=500, check_every=250)


def test_clipping_solves_the_tiny_task_where_plain_sgd_diverges():
    plain = temporal_order_run("jax", TINY, 10, 0.3, False, 0)
    clipped = temporal_order_run("jax", TINY, 10, 0.3, True, 0)
    assert plain["diverged"] and not plain["solved"], (
        f"plain SGD: max loss {plain['max_loss']:.3g} (first {plain['loss'][0]:.3g}), errors {plain['checks']}"
    )
    assert plain["final_error"] > 0.5, (
        f"plain SGD should stay near chance (0.75 wrong): {plain['checks']}"
    )
    assert clipped["solved"] and not clipped["diverged"], (
        f"clipped: max loss {clipped['max_loss']:.3g}, max norm {clipped['max_norm']:.3g}, errors {clipped['checks']}"
    )
    assert clipped["max_norm"] > TINY.threshold, (
        "the clipped run never clipped: the test shows nothing"
    )


def test_the_report_writes_its_figures_and_a_table_row_per_cell(tmp_path):
    import json

    from charclip.explode.paper import run_paper
    from charclip.explode.paper_report import write_paper_report

    # JAX alone (the backends' agreement is the parity tests'); the shapes of the test above, so no new compiles.
    micro = replace(TINY, grid=11, path_updates=3, max_updates=250)
    results = run_paper(micro, ("jax",), progress=False)
    out, outside = tmp_path / "report", tmp_path / "precious.txt"
    out.mkdir()
    outside.write_text("not charclip's")
    names = ("cliff.png", "bifurcation.png", "temporal-order.png", "report.md", "results.json")
    for name in names:  # links planted where the report goes: replaced, never followed
        (out / name).symlink_to(outside)
    write_paper_report(results, out)
    assert outside.read_text() == "not charclip's", "the report was written through a link"
    for name in names:
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for row in saved["temporal_order"]["table"]:
        method = "MSGD-C" if row["clip"] else "MSGD"
        line = f"| {row['length']} | {row['lr']:g} | {method} | {row['solved']}/{row['runs']} |"
        assert line in report, f"no row {line!r} in report.md"
    for p in saved["cliff"][
        "paths"
    ]:  # the rescaled path's longest step is at most lr * tau (plus rounding)
        r = p["backends"]["jax"]
        assert r["clipped_longest_step"] <= micro.path_lr * r["threshold"] * (1 + 1e-12)

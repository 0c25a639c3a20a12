"""The kit's promises for the clipping family (charclip/testing/family.py), checked.

Each deliberately wrong family clipper fails the promise its mistake breaks; charclip's
torch family keeps every promise in its own layout and breaks the unit bound when read
in the other one (the (out, in) against (in, out) mix-up the AGC promise exists for).
"""

from __future__ import annotations

import pytest
import torch

from charclip.testing import family as f
from charclip.torch import clip_family as ct

CONTROLS = {
    "agc_wrong_axis": f.agc_wrong_axis("out_last"),
    "block_rms_global": f.block_rms_global,
    "per_example_clip_after_sum": f.per_example_clip_after_sum,
}


@pytest.mark.parametrize("name", sorted(f.FAMILY_CONTROLS))
def test_each_wrong_family_clipper_fails_the_promise_it_breaks(name):
    family, breaks = f.FAMILY_CONTROLS[name]
    # NumPy only, so many examples cost little; 40 find each mistake under any seed.
    report = f.check_family(
        {family: CONTROLS[name]}, dtypes=["float64"], max_examples=40, shrink_budget=0
    )
    failed = {r.promise for r in report.rows if r.verdict == "fails"}
    assert breaks <= failed, f"{name}: {sorted(breaks - failed)} not found\n{report.table()}"
    refused = {p for p in failed if p.endswith("_refused")}
    assert not refused, f"{name} refuses bad thresholds, yet failed {refused}"


def _torch_family():
    torch.set_num_threads(1)
    return {
        "agc": f.torch_agc(ct.adaptive_grad_clip_),
        "block_rms": f.torch_leafwise(ct.clip_grad_block_rms_),
        "per_example": f.torch_per_example(ct.per_example_global_norm_clip),
    }


def test_charclip_torch_family_keeps_every_promise():
    report = f.check_family(_torch_family(), layout="out_first", max_examples=8)
    assert report.ok, report.table()
    assert {r.promise for r in report.rows} == set(f.FAMILY_PROMISES)


def test_agc_read_in_the_wrong_layout_breaks_the_unit_bound():
    """torch's AGC clips (out, in) rows; a checker expecting optax's (in, out) columns sees
    units above their bound: the promise tells the two layouts apart."""
    agc = {"agc": _torch_family()["agc"]}
    wrong = f.check_family(
        agc,
        layout="out_last",
        promises=["agc_unit_bound"],
        dtypes=["float64"],
        max_examples=40,
        shrink_budget=0,
    )
    (row,) = wrong.rows
    assert row.verdict == "fails" and "unit" in row.message, wrong.table()


def test_check_family_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown families"):
        f.check_family({"agc2": f.block_rms_global})
    with pytest.raises(ValueError, match="layout must be one of"):
        f.check_family({"block_rms": f.block_rms_global}, layout="io")
    with pytest.raises(ValueError, match="unknown promises"):
        f.check_family({"block_rms": f.block_rms_global}, promises=["block_rms_boundd"])

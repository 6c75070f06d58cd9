"""Preemption agreement across 2 gloo ranks."""
from __future__ import annotations

from _workers_checkpoint import preempt_agree
from conftest import run_ranks


def test_signal_on_one_rank_stops_all_ranks():
    results = run_ranks(preempt_agree, 2)
    assert [r["first"] for r in results] == [False, False]
    assert [r["second"] for r in results] == [True, True]
    assert [r["local"] for r in results] == [False, True]

"""The registry of science tasks and the `verify` dispatcher."""

from __future__ import annotations

import pytest

from loramix.science.registry import COMPOSITE, DOMAINS, TASKS, get_task, verify


def test_every_domain_has_a_forward_and_a_design_task():
    assert set(TASKS) == {*DOMAINS, COMPOSITE}
    for domain in DOMAINS:
        names = [task.name for task in TASKS[domain]]
        assert any(name.startswith("design") for name in names), domain
        assert any(not name.startswith("design") for name in names), domain
        assert len(set(names)) == len(names)
        assert all(task.domain == domain for task in TASKS[domain])


def test_get_task_lists_the_known_tasks_when_missing():
    with pytest.raises(KeyError, match="biology/translate"):
        get_task("biology", "no_such_task")


def test_verify_dispatches_on_domain_and_task():
    pytest.importorskip("Bio", reason="science extra not installed: pip install 'loramix[science]'")
    example = {"prompt": "", "completion": "", "domain": "biology", "task": "translate"}
    assert verify({**example, "answer": "MAF"}, "M-A-F")
    assert not verify({**example, "answer": "MAF"}, "M-A-L")

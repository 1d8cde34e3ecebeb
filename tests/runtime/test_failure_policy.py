"""The failure policy decides from the failure history alone (no Ray, no workers)."""

from trainmem.runtime.failure import FailurePolicy


def _f(kind, cause="x", step=5):
    return {"kind": kind, "cause": cause, "step": step}


def test_transient_failures_restart_until_the_budget_is_spent():
    policy = FailurePolicy(max_restarts=2)
    history = [_f("died", step=3)]
    assert policy.decide(history).action == "restart"
    policy.record_restart()
    history.append(_f("hung", step=9))
    assert policy.decide(history).action == "restart"
    policy.record_restart()
    history.append(_f("died", step=12))
    decision = policy.decide(history)
    assert decision.action == "stop" and "2 restarts used" in decision.reason


def test_the_same_error_at_the_same_step_stops_but_a_new_one_restarts():
    policy = FailurePolicy(max_restarts=5)
    assert policy.decide([_f("error", "ValueError: bad", 7)]).action == "restart"
    same = [_f("error", "ValueError: bad", 7), _f("error", "ValueError: bad", 7)]
    assert policy.decide(same).action == "stop" and "not transient" in policy.decide(same).reason
    assert policy.decide([_f("error", "ValueError: bad", 7), _f("error", "ValueError: bad", 8)]).action == "restart"
    assert policy.decide([_f("died", "gone", 7), _f("error", "gone", 7)]).action == "restart"


def test_unstartable_and_unrestorable_jobs_stop_at_once():
    assert FailurePolicy(max_restarts=9).decide([_f("start")]).action == "stop"
    decision = FailurePolicy(max_restarts=9).decide([_f("restore")])
    assert decision.action == "stop" and "no checkpoint" in decision.reason


def test_lost_ranks_are_replaced_alone_when_the_engine_allows_else_the_group_restarts():
    policy = FailurePolicy(max_restarts=5)
    died = {"kind": "died", "cause": "gone", "step": 4, "ranks": [2], "during": "training"}
    assert policy.decide([died], can_replace=(True, "")).action == "replace"
    assert policy.decide([dict(died, kind="hung")], can_replace=(True, "")).action == "replace"
    no = policy.decide([died], can_replace=(False, "the DeepSpeed engine cannot re-form its groups"))
    assert no.action == "restart" and "DeepSpeed" in no.reason
    raised = policy.decide([dict(died, kind="error")], can_replace=(True, ""))
    assert raised.action == "restart" and "raised" in raised.reason
    failed_replacement = policy.decide([died, dict(died, during="replacement")], can_replace=(True, ""))
    assert failed_replacement.action == "restart" and "replacement failed" in failed_replacement.reason

"""Pipeline schedules as data: the generators, the checker (planted faults must be caught) and the
timing model, in one process (no ranks)."""
from __future__ import annotations

import dataclasses

import pytest

from llmkern.parallel.pipeline import schedules as sch
from llmkern.parallel.pipeline.schedules import Action, Costs, Schedule, ScheduleError, make_schedule, simulate


def _valid(name, p, m, v):
    try:
        make_schedule(name, p, m, v)
    except ScheduleError:
        return False
    return True


@pytest.mark.parametrize("name", sch.SCHEDULES)
def test_every_valid_schedule_passes_the_checker(name):
    """Every (p, m, v) a schedule accepts is checked at construction: forward before backward,
    matched messages in channel order, no deadlock. Some sizes must be accepted."""
    accepted = 0
    for p in range(1, 7):
        for m in range(1, 14):
            for v in ((2, 3) if name == "interleaved_1f1b" else (1,)):
                if _valid(name, p, m, v):
                    accepted += 1
                    s = make_schedule(name, p, m, v)
                    per_stage = {}
                    for r in range(p):
                        for a in s.compute(r):
                            per_stage.setdefault((a.stage, a.microbatch), []).append(a.kind)
                    assert len(per_stage) == p * v * m
                    assert all(sorted(k) in (["B", "F"], ["F", "I", "W"]) for k in per_stage.values())
    assert accepted > 30


@pytest.mark.parametrize("p,m", [(2, 2), (2, 5), (4, 4), (4, 8), (4, 9), (3, 7)])
def test_gpipe_and_1f1b_step_time_and_memory(p, m):
    c = Costs(forward=1.0, backward=2.0)
    g, f = simulate(make_schedule("gpipe", p, m), c), simulate(make_schedule("1f1b", p, m), c)
    assert g.step_time == f.step_time == (m + p - 1) * 3.0
    assert g.bubble == pytest.approx((p - 1) / (m + p - 1))
    assert g.peak_in_flight == {s: m for s in range(p)}
    assert f.peak_in_flight == {s: min(p - s, m) for s in range(p)}
    assert sch.predicted_step_time("1f1b", p, m, costs=c) == f.step_time


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (2, 6, 3), (4, 12, 2)])
def test_interleaved_divides_the_bubble_by_v(p, m, v):
    """Per-chunk costs 1/v of a whole stage's: the step is (mv + p - 1) chunk times, the 1F1B bubble
    over v."""
    c = Costs(forward=1.0 / v, backward=2.0 / v)
    t = simulate(make_schedule("interleaved_1f1b", p, m, v), c).step_time
    assert t == pytest.approx((m * v + p - 1) * 3.0 / v)
    assert t == pytest.approx(sch.predicted_step_time("interleaved_1f1b", p, m, v, costs=c))
    one = simulate(make_schedule("1f1b", p, m), Costs(forward=1.0, backward=2.0)).step_time
    assert one - t == pytest.approx((p - 1) * 3.0 * (1 - 1 / v))


@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8), (4, 16), (8, 16)])
def test_zero_bubble_beats_1f1b_within_1f1b_memory(p, m):
    c = Costs(forward=1.0, backward=2.0, first_stage_input_grad=True)
    s = make_schedule("zero_bubble", p, m, costs=c)
    zb, one = simulate(s, c), simulate(make_schedule("1f1b", p, m), c)
    bound = sch.predicted_step_time("zero_bubble", p, m, costs=c)  # 3m + (p - 1)
    assert bound == 3 * m + (p - 1)
    assert bound <= zb.step_time <= bound + 2 and zb.step_time < one.step_time
    assert max(zb.peak_in_flight.values()) <= p  # 1F1B's peak (on its rank 0)
    kinds = {a.kind for r in range(p) for a in s.compute(r)}
    assert kinds == {"F", "I", "W"}


def test_costs_of_the_first_stage_without_input_gradient():
    c = Costs(forward=1.0, backward=2.0)
    assert c.of(Action(0, "I", 0)) == 0.0 and c.of(Action(0, "W", 0)) == 2.0
    assert c.of(Action(1, "I", 0)) == 1.0 and c.of(Action(1, "W", 0)) == 1.0


def _replace_rank(s: Schedule, r: int, acts) -> Schedule:
    actions = list(s.actions)
    actions[r] = tuple(acts)
    return dataclasses.replace(s, actions=tuple(actions))


def test_checker_catches_a_planted_deadlock():
    """Rank 0 waits for micro-batch 0's gradient before it sends micro-batch 1's activation, while
    rank 1 waits for micro-batch 1's activation before it sends that gradient."""
    F, B = "F", "B"
    r0 = [Action(0, F, 0), Action(0, "SEND_F", 0), Action(0, "RECV_B", 0), Action(0, B, 0), Action(0, F, 1),
          Action(0, "SEND_F", 1), Action(0, "RECV_B", 1), Action(0, B, 1)]
    r1 = [Action(1, "RECV_F", 0), Action(1, "RECV_F", 1), Action(1, F, 0), Action(1, F, 1), Action(1, B, 0),
          Action(1, "SEND_B", 0), Action(1, B, 1), Action(1, "SEND_B", 1)]
    s = Schedule("planted", 2, 2, 2, (tuple(r0), tuple(r1)))
    with pytest.raises(ScheduleError, match="deadlock") as e:
        sch.check(s)
    msg = str(e.value)
    assert "rank 0 at action 3 (B0@s0) waits for the input gradient of stage 1 micro-batch 0 from rank 1" in msg
    assert "rank 1 at action 3 (F1@s1) waits for the activation of stage 0 micro-batch 1 from rank 0" in msg
    # the same actions, reordered as 1F1B: no deadlock
    r1_ok = [Action(1, "RECV_F", 0), Action(1, "RECV_F", 1), Action(1, F, 0), Action(1, B, 0),
             Action(1, "SEND_B", 0), Action(1, F, 1), Action(1, B, 1), Action(1, "SEND_B", 1)]
    sch.check(_replace_rank(s, 1, r1_ok))


def test_checker_catches_out_of_order_and_missing_messages():
    s = make_schedule("1f1b", 2, 4)
    r1 = list(s.actions[1])
    recvs = [i for i, a in enumerate(r1) if a.kind == "RECV_F"]
    r1[recvs[0]], r1[recvs[1]] = r1[recvs[1]], r1[recvs[0]]  # posted in another order than sent
    with pytest.raises(ScheduleError, match="matched in order"):
        sch.check(_replace_rank(s, 1, r1))
    r0 = [a for a in s.actions[0] if a != Action(0, "SEND_F", 3)]
    with pytest.raises(ScheduleError, match="3 sends but 4 receives"):
        sch.check(_replace_rank(s, 0, r0))
    r0 = list(s.actions[0])
    recv = r0.pop(r0.index(Action(0, "RECV_B", 0)))
    r0.insert(r0.index(Action(0, "B", 0)) + 1, recv)  # posted after the backward that waits for it
    with pytest.raises(ScheduleError, match=r"B0@s0\) needs the input gradient of stage 1 micro-batch 0 from rank 1, "
                                            r"but no receive was posted before it"):
        sch.check(_replace_rank(s, 0, r0))


def test_checker_catches_bad_orders():
    s = make_schedule("gpipe", 2, 2)
    r0 = list(s.actions[0])
    i, j = r0.index(Action(0, "F", 1)), r0.index(Action(0, "B", 1))
    r0[i], r0[j] = r0[j], r0[i]
    with pytest.raises(ScheduleError, match="backward before its forward"):
        sch.check(_replace_rank(s, 0, r0))
    with pytest.raises(ScheduleError, match="not on rank 0"):
        sch.check(_replace_rank(s, 0, list(s.actions[0]) + [Action(1, "F", 0)]))
    with pytest.raises(ScheduleError, match="no backward"):
        sch.check(_replace_rank(s, 0, [a for a in s.actions[0] if a != Action(0, "B", 0)]))
    with pytest.raises(ScheduleError, match="appears twice"):
        sch.check(_replace_rank(s, 0, list(s.actions[0]) + [Action(0, "F", 0)]))
    zb = make_schedule("zero_bubble", 2, 2)
    r0 = list(zb.actions[0])
    i, w = r0.index(Action(0, "I", 0)), r0.index(Action(0, "W", 0))
    r0[i], r0[w] = r0[w], r0[i]
    with pytest.raises(ScheduleError, match="W before I"):
        sch.check(_replace_rank(zb, 0, r0))


def test_bad_parameters_are_clear_errors():
    with pytest.raises(ScheduleError, match=r"m=2 < p=4.*'gpipe'"):
        make_schedule("1f1b", 4, 2)
    with pytest.raises(ScheduleError, match="m=3 < p=4"):
        make_schedule("zero_bubble", 4, 3)
    with pytest.raises(ScheduleError, match="virtual_stages >= 2"):
        make_schedule("interleaved_1f1b", 2, 4, 1)
    with pytest.raises(ScheduleError, match="virtual_stages=2 needs 'interleaved_1f1b'"):
        make_schedule("1f1b", 2, 4, 2)
    with pytest.raises(ScheduleError, match=r"2 equal rounds.*m=5"):
        make_schedule("interleaved_1f1b", 2, 5, 2)
    with pytest.raises(ScheduleError, match="unknown pipeline schedule 'pipedream'"):
        make_schedule("pipedream", 2, 4)


def test_format_timeline_shows_every_rank():
    s = make_schedule("1f1b", 3, 4)
    text = sch.format_timeline(s, simulate(s), width=60)
    rows = text.splitlines()
    assert len(rows) == 3 and all(len(r) == len(rows[0]) for r in rows)
    assert rows[2].startswith("rank 2  |") and "." in rows[0]  # rank 0 waits at the turn


def test_plan_cli_prints_timeline_bubble_and_memory(capsys):
    from llmkern.parallel import plan

    assert plan.main(["--pipeline", "--stages", "4", "--microbatches", "8", "--schedule", "1f1b"]) == 0
    out = capsys.readouterr().out
    assert "bubble 0.273" in out and "(m + p - 1)(t_f + t_b) = 33" in out
    assert "peak in-flight micro-batches per stage: 4 3 2 1" in out
    assert plan.main(["--pipeline", "--stages", "4", "--microbatches", "2", "--schedule", "1f1b"]) == 2
    assert "m=2 < p=4" in capsys.readouterr().err
    from llmkern.cli import main  # `llmkern plan ...`

    assert main(["plan", "--pipeline", "--stages", "2", "--microbatches", "4", "--schedule", "zero_bubble"]) == 0
    assert "pipeline plan: zero_bubble" in capsys.readouterr().out

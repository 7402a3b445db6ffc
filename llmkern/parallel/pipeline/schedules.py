"""Pipeline schedules as data: what each rank does, in order, checked before anything runs.

A schedule is, for every pipeline rank, a list of `Action(stage, kind, microbatch)`:

    F       forward of `stage` on micro-batch `microbatch`
    B       its whole backward (input and weight gradients)
    I, W    the backward split in two (zero-bubble schedules): I computes the gradient of the
            stage input (what the previous stage waits for), W the weight gradients, later
    SEND_F  send stage `stage`'s output for the micro-batch to the rank of stage + 1
    RECV_F  post the receive of stage `stage`'s input (sent by SEND_F of stage - 1)
    SEND_B  send the gradient of stage `stage`'s input to the rank of stage - 1
    RECV_B  post the receive of the gradient of stage `stage`'s output (sent by SEND_B of stage + 1)

Stage s lives on rank s % ranks, so with v virtual stages per rank, rank r holds stages r, r + p,
..., r + (v - 1)p (Megatron's interleaved placement).

The communication semantics, which the runtime (`llmkern.parallel.pipeline`) implements and
`simulate` models: a SEND never blocks (an async send, completed by the end of the step); a RECV
only posts an async receive; the compute that consumes it (F for RECV_F, B or I for RECV_B) waits
until the matching SEND has happened. Between two ranks, the messages of one direction are matched
in order (NCCL has no tags), so a rank posts its receives from a peer in the order that peer sends.

`check(schedule)` raises `ScheduleError` naming the first violated rule: every (stage,
micro-batch) has one F and one B (or one I and one W), F before its backward and I before W, every
SEND matched by one RECV in channel order, every compute after the receive it needs is posted, and
no deadlock (the blocking semantics above, simulated until every rank has finished or all are
stuck). `simulate(schedule, costs)` also gives the predicted timeline, step time, bubble, and the
peak number of micro-batches whose activations a stage holds.
"""
from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict
from typing import Literal

Kind = Literal["F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B"]
ScheduleName = Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"]
COMPUTE_KINDS = ("F", "B", "I", "W")
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")


class ScheduleError(ValueError):
    """A schedule that breaks one of the rules `check` enforces, or parameters no schedule fits."""


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    """One step of one rank: `kind` on `stage` for micro-batch `microbatch`."""

    stage: int
    """Pipeline stage (0 .. stages - 1), held by rank stage % ranks."""
    kind: Kind
    """What to do; see the module docstring."""
    microbatch: int
    """Micro-batch index (0 .. microbatches - 1)."""

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@s{self.stage}"


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """The actions of every rank of one pipeline for one training step."""

    name: str
    """The schedule it was made by (or any label, for hand-written schedules)."""
    ranks: int
    """Pipeline ranks p."""
    stages: int
    """Stages in all, p × virtual stages per rank."""
    microbatches: int
    """Micro-batches m per step."""
    actions: tuple[tuple[Action, ...], ...]
    """actions[r]: rank r's actions in execution order."""

    def rank_of(self, stage: int) -> int:
        return stage % self.ranks

    def stages_of(self, rank: int) -> list[int]:
        return list(range(rank, self.stages, self.ranks))

    def compute(self, rank: int) -> list[Action]:
        """Rank `rank`'s compute actions (F, B, I, W), in order."""
        return [a for a in self.actions[rank] if a.kind in COMPUTE_KINDS]


# --- compute orders ------------------------------------------------------------------------------


def _gpipe(p: int, m: int) -> list[list[Action]]:
    """All forwards, then all backwards (in micro-batch order, as torch's ScheduleGPipe): every
    stage holds all m micro-batches' activations at the turn."""
    return [[Action(r, "F", i) for i in range(m)] + [Action(r, "B", i) for i in range(m)] for r in range(p)]


def _one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """PipeDream-flush 1F1B: rank r runs min(p - r - 1, m) warm-up forwards, then alternates one
    forward and one backward, then drains: at most p - r micro-batches in flight on rank r."""
    orders = []
    for r in range(p):
        warm = min(p - r - 1, m)
        order = [Action(r, "F", i) for i in range(warm)]
        for i in range(m - warm):
            order += [Action(r, "F", warm + i), Action(r, "B", i)]
        order += [Action(r, "B", i) for i in range(m - warm, m)]
        orders.append(order)
    return orders


def interleaved_rounds(p: int, m: int) -> tuple[int, int]:
    """(rounds, micro-batches per round) of the interleaved schedule: micro-batches go through a
    rank's virtual stages in groups of m / rounds, rounds = max(1, m // p) (Megatron groups by p,
    which needs m % p == 0; grouping by rounds also covers m < p and, e.g., p = 4, m = 6)."""
    rounds = max(1, m // p)
    if m % rounds:
        raise ScheduleError(f"interleaved_1f1b needs the micro-batches to split into {rounds} equal rounds "
                            f"(rounds = max(1, m // p) with p={p} ranks), got m={m}; use m = "
                            f"{rounds * (m // rounds)} or {rounds * (m // rounds + 1)}")
    return rounds, m // rounds


def _interleaved(p: int, v: int, m: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: rank r runs its v chunks on groups of g micro-batches in turn
    (forward chunk order 0..v-1, backward v-1..0), with 2(p - r - 1) + (v - 1)g warm-up forwards."""
    _, g = interleaved_rounds(p, m)
    total = m * v
    orders = []
    for r in range(p):
        def fwd(k, r=r):
            chunk = (k // g) % v
            return Action(chunk * p + r, "F", (k // (g * v)) * g + k % g)

        def bwd(k, r=r):
            chunk = v - 1 - (k // g) % v
            return Action(chunk * p + r, "B", (k // (g * v)) * g + k % g)

        warm = min(2 * (p - r - 1) + (v - 1) * g, total)
        order = [fwd(k) for k in range(warm)]
        for k in range(total - warm):
            order += [fwd(warm + k), bwd(k)]
        order += [bwd(k) for k in range(total - warm, total)]
        orders.append(order)
    return orders


@dataclasses.dataclass(kw_only=True, slots=True)
class Costs:
    """Durations for `simulate` and the zero-bubble generator, in any unit (seconds in benchmarks)."""

    forward: float = 1.0
    """One stage forward on one micro-batch."""
    backward: float = 2.0
    """One whole stage backward (B). Twice the forward, as for matmuls (dX and dW each cost one)."""
    input_grad: float | None = None
    """I: the input-gradient part of the backward; None is backward / 2."""
    weight_grad: float | None = None
    """W: the weight-gradient part; None is backward - input_grad. Stage 0 has no input gradient
    to compute when its input (token ids) needs none: its I costs 0 and its W the whole backward."""
    message: float = 0.0
    """Latency of one send between ranks."""
    first_stage_input_grad: bool = False
    """Whether stage 0's input needs a gradient (float inputs that require grad); False matches
    the runtime on token ids and on inputs that do not require grad."""

    def of(self, a: Action) -> float:
        if a.kind == "F":
            return self.forward
        if a.kind == "B":
            return self.backward
        i = self.backward / 2 if self.input_grad is None else self.input_grad
        w = self.backward - i if self.weight_grad is None else self.weight_grad
        if a.stage == 0 and not self.first_stage_input_grad:
            i, w = 0.0, i + w
        return i if a.kind == "I" else w


def _zero_bubble(p: int, m: int, costs: Costs) -> list[list[Action]]:
    """ZB-H1 (zero-bubble within 1F1B's peak memory): a list scheduler over simulated time.
    Whenever a rank is idle it starts, in this order of preference: the I whose output gradient
    has arrived (the previous stage waits for it), a forward whose input has arrived if fewer than
    p micro-batches are in flight on it (F done, W not done: 1F1B's peak, which 1F1B reaches on
    rank 0 only), else a deferred W. The W passes fill what would be 1F1B's bubble. With
    F = I = W = 1 the bound is 3m + (p - 1) against 1F1B's 3(m + p - 1); this order reaches the
    bound + 2 for p = 4 and 8, m = 8..32 (simulated). Capping rank r at 1F1B's own p - r
    instead costs +3 to +7 there (p = 4 and 8), so the later ranks may hold up to p."""
    orders: list[list[Action]] = [[] for _ in range(p)]
    busy_until = [0.0] * p
    f_next, i_next, in_flight = [0] * p, [0] * p, [0] * p
    w_pending: list[list[int]] = [[] for _ in range(p)]
    act_at: dict[tuple[int, int], float] = {(0, i): 0.0 for i in range(m)}  # (stage, mb) -> arrival
    grad_at: dict[tuple[int, int], float] = {}
    now = 0.0
    while any(len(o) < 3 * m for o in orders):
        progressed = True
        while progressed:  # zero-cost actions (stage 0's I) leave a rank idle at the same instant
            progressed = False
            for r in range(p):
                if busy_until[r] > now or len(orders[r]) == 3 * m:
                    continue
                a = None
                ready = now if r == p - 1 else grad_at.get((r, i_next[r]), now + 1)
                if i_next[r] < f_next[r] and ready <= now:
                    a = Action(r, "I", i_next[r])
                elif f_next[r] < m and in_flight[r] < p and act_at.get((r, f_next[r]), now + 1) <= now:
                    a = Action(r, "F", f_next[r])
                elif w_pending[r]:
                    a = Action(r, "W", w_pending[r][0])
                if a is None:
                    continue
                end = now + costs.of(a)
                orders[r].append(a)
                busy_until[r] = end
                progressed = True
                if a.kind == "F":
                    f_next[r] += 1
                    in_flight[r] += 1
                    if r < p - 1:
                        act_at[(r + 1, a.microbatch)] = end + costs.message
                elif a.kind == "I":
                    i_next[r] += 1
                    w_pending[r].append(a.microbatch)
                    if r > 0:
                        grad_at[(r - 1, a.microbatch)] = end + costs.message
                else:
                    w_pending[r].pop(0)
                    in_flight[r] -= 1
        later = [t for t in busy_until + list(act_at.values()) + list(grad_at.values()) if t > now]
        if not later:
            break
        now = min(later)
    return orders


# --- communication -------------------------------------------------------------------------------


def _message_of(a: Action, p: int, stages: int) -> tuple[tuple, int, int] | None:
    """(message id, src rank, dst rank) that compute `a` needs to receive, or None."""
    r = a.stage % p
    if a.kind == "F" and a.stage > 0 and (a.stage - 1) % p != r:
        return ("F", a.stage - 1, a.microbatch), (a.stage - 1) % p, r
    if a.kind in ("B", "I") and a.stage < stages - 1 and (a.stage + 1) % p != r:
        return ("B", a.stage + 1, a.microbatch), (a.stage + 1) % p, r
    return None


def _sends_of(a: Action, p: int, stages: int) -> list[Action]:
    r = a.stage % p
    if a.kind == "F" and a.stage < stages - 1 and (a.stage + 1) % p != r:
        return [Action(a.stage, "SEND_F", a.microbatch)]
    if a.kind in ("B", "I") and a.stage > 0 and (a.stage - 1) % p != r:
        return [Action(a.stage, "SEND_B", a.microbatch)]
    return []


def _recv_action(msg: tuple) -> Action:
    kind, src_stage, mb = msg
    return Action(src_stage + 1, "RECV_F", mb) if kind == "F" else Action(src_stage - 1, "RECV_B", mb)


def _sent_message(a: Action) -> tuple:
    return ("F" if a.kind == "SEND_F" else "B", a.stage, a.microbatch)


def _received_message(a: Action) -> tuple:
    return ("F", a.stage - 1, a.microbatch) if a.kind == "RECV_F" else ("B", a.stage + 1, a.microbatch)


def with_communication(compute: list[list[Action]], ranks: int, stages: int, *, lookahead: int = 1
                       ) -> tuple[tuple[Action, ...], ...]:
    """Inserts the sends and receives into per-rank compute orders. A send follows the compute that
    produces its tensor. Receives are posted `lookahead` computes ahead of the one that consumes
    them (so the transfer overlaps that compute), and in each peer's send order (FIFO channels):
    when a needed message comes after others on its channel, those are posted first."""
    p = ranks
    channel_order: dict[tuple[int, int], list[tuple]] = defaultdict(list)  # (src, dst) -> messages
    for r in range(p):
        for a in compute[r]:
            for s in _sends_of(a, p, stages):
                kind, st, mb = _sent_message(s)
                dst = (st + 1) % p if kind == "F" else (st - 1) % p
                channel_order[(r, dst)].append(_sent_message(s))
    out = []
    for r in range(p):
        posted: dict[int, int] = defaultdict(int)  # src -> messages of channel (src, r) posted
        seq: list[Action] = []

        def post_through(a: Action) -> None:
            need = _message_of(a, p, stages)
            if need is None:
                return
            msg, src, _ = need
            order = channel_order[(src, r)]
            if msg not in order:
                return  # no sender: check() reports it
            upto = order.index(msg) + 1
            while posted[src] < upto:
                seq.append(_recv_action(order[posted[src]]))
                posted[src] += 1

        order_r = compute[r]
        for k, a in enumerate(order_r):
            for ahead in order_r[k:k + 1 + lookahead]:
                post_through(ahead)
            seq.append(a)
            seq.extend(_sends_of(a, p, stages))
        out.append(tuple(seq))
    return tuple(out)


# --- construction ----------------------------------------------------------------------------------


def make_schedule(name: ScheduleName, ranks: int, microbatches: int, virtual_stages: int = 1, *,
                  costs: Costs | None = None) -> Schedule:
    """The schedule `name` for `ranks` pipeline ranks and `microbatches` micro-batches, checked.

    gpipe: any m >= 1. 1f1b: m >= p (with fewer micro-batches it never reaches its steady state:
    use gpipe). interleaved_1f1b: virtual_stages >= 2 and m split into equal rounds (see
    `interleaved_rounds`). zero_bubble: m >= p; `costs` tunes its order (default F=1, I=W=1).
    """
    p, m, v = ranks, microbatches, virtual_stages
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if p < 1 or m < 1 or v < 1:
        raise ScheduleError(f"a schedule needs ranks >= 1, microbatches >= 1 and virtual_stages >= 1, got "
                            f"ranks={p}, microbatches={m}, virtual_stages={v}")
    if name == "interleaved_1f1b":
        if v < 2:
            raise ScheduleError(f"interleaved_1f1b needs virtual_stages >= 2 (stages per rank), got {v}; with 1 it "
                                f"is plain '1f1b'")
    elif v != 1:
        raise ScheduleError(f"schedule {name!r} runs one stage per rank; virtual_stages={v} needs "
                            f"'interleaved_1f1b'")
    if name in ("1f1b", "zero_bubble") and m < p:
        raise ScheduleError(f"schedule {name!r} needs microbatches >= pipeline ranks, got m={m} < p={p}: with "
                            f"fewer micro-batches than stages it never reaches its steady state; use "
                            f"'gpipe' or more micro-batches")
    if name == "gpipe":
        compute = _gpipe(p, m)
    elif name == "1f1b":
        compute = _one_f_one_b(p, m)
    elif name == "interleaved_1f1b":
        compute = _interleaved(p, v, m)
    else:
        compute = _zero_bubble(p, m, costs or Costs(forward=1.0, backward=2.0))
    sched = Schedule(name, p, p * v, m, with_communication(compute, p, p * v))
    check(sched)
    return sched


# --- checking and simulation -----------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Timeline:
    """What `simulate` predicts for one step."""

    spans: list[list[tuple[float, float, Action]]]
    """spans[r]: (start, end, action) of rank r's compute actions."""
    step_time: float
    """When the last rank finishes."""
    busy: list[float]
    """Compute time per rank."""
    peak_in_flight: dict[int, int]
    """Stage -> most micro-batches whose activations it holds at once (F done, B or W not done)."""

    @property
    def bubble(self) -> float:
        """Idle share of the step, averaged over ranks: 1 - busy / (ranks × step time)."""
        if self.step_time <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.step_time)


def _check_static(s: Schedule) -> None:
    p, S, m = s.ranks, s.stages, s.microbatches
    if len(s.actions) != p:
        raise ScheduleError(f"schedule has action lists for {len(s.actions)} ranks, expected {p}")
    if S % p:
        raise ScheduleError(f"{S} stages do not divide evenly over {p} ranks")
    seen: dict[tuple, tuple[int, int]] = {}  # (kind, stage, mb) -> (rank, position)
    for r, acts in enumerate(s.actions):
        for pos, a in enumerate(acts):
            if not 0 <= a.stage < S or a.stage % p != r:
                raise ScheduleError(f"rank {r} action {pos} ({a}): stage {a.stage} is not on rank {r} "
                                    f"(stage s lives on rank s % {p}, {S} stages)")
            if not 0 <= a.microbatch < m:
                raise ScheduleError(f"rank {r} action {pos} ({a}): micro-batch out of range 0..{m - 1}")
            key = (a.kind, a.stage, a.microbatch)
            if key in seen:
                raise ScheduleError(f"rank {r}: {a} appears twice (actions {seen[key][1]} and {pos})")
            seen[key] = (r, pos)
    for st in range(S):
        r = st % p
        for i in range(m):
            f = seen.get(("F", st, i))
            b, ig, w = seen.get(("B", st, i)), seen.get(("I", st, i)), seen.get(("W", st, i))
            name = f"stage {st} micro-batch {i} (rank {r})"
            if f is None:
                raise ScheduleError(f"{name}: no forward F")
            if b is None and (ig is None or w is None):
                raise ScheduleError(f"{name}: no backward (needs B, or both I and W)")
            if b is not None and (ig is not None or w is not None):
                raise ScheduleError(f"{name}: both B and I/W")
            first_bwd = b if b is not None else ig
            if first_bwd[1] < f[1]:
                raise ScheduleError(f"{name}: backward before its forward")
            if w is not None and w[1] < ig[1]:
                raise ScheduleError(f"{name}: W before I")
            # local hand-offs (both stages on one rank) must be in data order
            if st > 0 and (st - 1) % p == r and seen[("F", st - 1, i)][1] > f[1]:
                raise ScheduleError(f"{name}: forward before stage {st - 1}'s forward on the same rank")
            if st < S - 1 and (st + 1) % p == r:
                nb = seen.get(("B", st + 1, i)) or seen.get(("I", st + 1, i))
                if nb is not None and nb[1] > first_bwd[1]:
                    raise ScheduleError(f"{name}: backward before stage {st + 1}'s on the same rank")
    # sends follow their producer; each message has one send and one receive, in channel order
    sends: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    for r, acts in enumerate(s.actions):
        for pos, a in enumerate(acts):
            if a.kind in ("SEND_F", "SEND_B"):
                producer = ("F" if a.kind == "SEND_F" else "B", a.stage, a.microbatch)
                src = seen.get(producer) or (seen.get(("I", a.stage, a.microbatch)) if a.kind == "SEND_B" else None)
                if src is None or src[1] > pos:
                    raise ScheduleError(f"rank {r} action {pos} ({a}): sends a tensor its compute has not produced yet")
                if (a.kind == "SEND_F" and a.stage == S - 1) or (a.kind == "SEND_B" and a.stage == 0):
                    raise ScheduleError(f"rank {r} action {pos} ({a}): no stage to send to")
                dst = (a.stage + 1) % p if a.kind == "SEND_F" else (a.stage - 1) % p
                if dst == r:
                    raise ScheduleError(f"rank {r} action {pos} ({a}): a send to itself")
                sends[(r, dst)].append(_sent_message(a))
            elif a.kind in ("RECV_F", "RECV_B"):
                msg = _received_message(a)
                if not 0 <= msg[1] < S:
                    raise ScheduleError(f"rank {r} action {pos} ({a}): no stage to receive from")
                src = msg[1] % p
                recvs[(src, r)].append(msg)
    for chan in set(sends) | set(recvs):
        a_, b_ = sends.get(chan, []), recvs.get(chan, [])
        if a_ != b_:
            for k, (x, y) in enumerate(zip(a_, b_)):
                if x != y:
                    raise ScheduleError(f"rank {chan[0]} -> rank {chan[1]}: message {k} is sent as {_fmt(x)} but "
                                        f"received as {_fmt(y)} (messages between two ranks are matched in order)")
            raise ScheduleError(f"rank {chan[0]} -> rank {chan[1]}: {len(a_)} sends but {len(b_)} receives")
    # every cross-rank input is received, and posted before its consumer
    for r, acts in enumerate(s.actions):
        posted = set()
        for pos, a in enumerate(acts):
            if a.kind in ("RECV_F", "RECV_B"):
                posted.add(_received_message(a))
            elif a.kind in ("F", "B", "I"):
                need = _message_of(a, p, S)
                if need is not None and need[0] not in posted:
                    raise ScheduleError(f"rank {r} action {pos} ({a}) needs {_fmt(need[0])} from rank {need[1]}, "
                                        f"but no receive was posted before it")


def _fmt(msg: tuple) -> str:
    kind, st, mb = msg
    return (f"the activation of stage {st} micro-batch {mb}" if kind == "F"
            else f"the input gradient of stage {st} micro-batch {mb}")


def simulate(s: Schedule, costs: Costs | None = None) -> Timeline:
    """Runs the schedule on a model of the runtime: compute takes `costs`, sends are asynchronous and
    arrive `costs.message` later, a compute waits for the message it consumes. Raises ScheduleError
    on a deadlock, naming what every stuck rank waits for."""
    costs = costs or Costs()
    p = s.ranks
    sent_at: dict[tuple, float] = {}
    pc = [0] * p
    clock = [0.0] * p
    spans: list[list[tuple[float, float, Action]]] = [[] for _ in range(p)]
    # wake ranks in time order; a rank blocked on a message is re-queued when it is sent
    waiting: dict[tuple, int] = {}
    heap = [(0.0, r) for r in range(p)]
    while heap:
        _, r = heapq.heappop(heap)
        acts = s.actions[r]
        while pc[r] < len(acts):
            a = acts[pc[r]]
            if a.kind in ("SEND_F", "SEND_B"):
                msg = _sent_message(a)
                sent_at[msg] = clock[r] + costs.message
                if msg in waiting:
                    heapq.heappush(heap, (sent_at[msg], waiting.pop(msg)))
            elif a.kind in COMPUTE_KINDS:
                need = _message_of(a, p, s.stages)
                start = clock[r]
                if need is not None:
                    if need[0] not in sent_at:
                        waiting[need[0]] = r
                        break
                    start = max(start, sent_at[need[0]])
                clock[r] = start + costs.of(a)
                spans[r].append((start, clock[r], a))
            pc[r] += 1
    stuck = [r for r in range(p) if pc[r] < len(s.actions[r])]
    if stuck:
        lines = []
        for r in stuck:
            a = s.actions[r][pc[r]]
            need = _message_of(a, p, s.stages)
            lines.append(f"rank {r} at action {pc[r]} ({a}) waits for {_fmt(need[0])} from rank {need[1]}")
        raise ScheduleError("deadlock: " + "; ".join(lines))
    peak: dict[int, int] = {}
    for r in range(p):
        held: dict[int, int] = defaultdict(int)
        for _, _, a in spans[r]:
            if a.kind == "F":
                held[a.stage] += 1
                peak[a.stage] = max(peak.get(a.stage, 0), held[a.stage])
            elif a.kind in ("B", "W"):
                held[a.stage] -= 1
    busy = [sum(e - b for b, e, _ in sp) for sp in spans]
    return Timeline(spans, max(clock) if clock else 0.0, busy, dict(sorted(peak.items())))


def check(s: Schedule) -> None:
    """Raises ScheduleError if `s` breaks a rule (see the module docstring); returns None if not."""
    _check_static(s)
    simulate(s)


# --- reports -----------------------------------------------------------------------------------------


def predicted_step_time(name: ScheduleName, ranks: int, microbatches: int, virtual_stages: int = 1,
                        costs: Costs | None = None) -> float:
    """The textbook step time, with `costs` per stage (per chunk when interleaved): (m + p - 1)(t_f
    + t_b) for gpipe and 1f1b; (mv + p - 1)(t_f + t_b) for interleaved, i.e. the 1F1B bubble
    divided by v for the same work per rank; m(t_f + t_b) + (p - 1)(t_f + t_i - t_w) for
    zero-bubble (ZB-H1's bound, which `make_schedule`'s order reaches within 2 forward times).
    `simulate` gives the time of the actual order, message latency included."""
    c = costs or Costs()
    p, m, v = ranks, microbatches, virtual_stages
    t = c.forward + c.backward
    if name in ("gpipe", "1f1b"):
        return (m + p - 1) * t
    if name == "interleaved_1f1b":
        return (m * v + p - 1) * t
    i = c.backward / 2 if c.input_grad is None else c.input_grad
    w = c.backward - i if c.weight_grad is None else c.weight_grad
    return m * t + (p - 1) * max(c.forward + i - w, 0.0)


def format_timeline(s: Schedule, tl: Timeline, width: int = 100) -> str:
    """A text Gantt chart: one row per rank, one character per time unit (scaled to `width`),
    F/B/I/W with the micro-batch's last digit, '.' idle."""
    scale = width / tl.step_time if tl.step_time > 0 else 1.0
    rows = []
    for r, sp in enumerate(tl.spans):
        line = ["."] * width
        for b, e, a in sp:
            lo, hi = int(round(b * scale)), max(int(round(e * scale)), int(round(b * scale)) + 1)
            mark = a.kind.lower() if a.kind != "F" else "F"
            for k in range(lo, min(hi, width)):
                line[k] = mark if k > lo else f"{a.microbatch % 10}"
        rows.append(f"rank {r:<2d} |{''.join(line)}|")
    return "\n".join(rows)

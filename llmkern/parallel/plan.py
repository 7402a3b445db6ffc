"""`llmkern plan --pipeline`: a pipeline schedule's timeline, predicted bubble and activation memory,
without running anything; `llmkern plan --layout --config ...`: the tp x pp x dp layout of a Hugging
Face config with the schedule's plan joined (llmkern.parallel.tensor_parallel.plan).

    llmkern plan --pipeline --stages 4 --microbatches 8 --schedule 1f1b
    llmkern plan --pipeline --stages 4 --microbatches 8 --schedule interleaved_1f1b --virtual-stages 2
    llmkern plan --pipeline --stages 4 --microbatches 8 --schedule zero_bubble --forward 1 --backward 2

Costs are per stage (per chunk when interleaved) in any unit; the timeline is the checked schedule
run on the model in `llmkern.parallel.pipeline.schedules.simulate`.
"""
from __future__ import annotations

import argparse
import sys

from llmkern.parallel.pipeline import schedules as sch


def pipeline_report(name: str, stages: int, microbatches: int, virtual_stages: int = 1, *, forward: float = 1.0,
                    backward: float = 2.0, message: float = 0.0, width: int = 100, actions: bool = False) -> str:
    """The text `llmkern plan --pipeline` prints (raises ScheduleError for a schedule that cannot be)."""
    c = sch.Costs(forward=forward, backward=backward, message=message)
    s = sch.make_schedule(name, stages, microbatches, virtual_stages, costs=c)
    tl = sch.simulate(s, c)
    p, m, v = stages, microbatches, virtual_stages
    closed = sch.predicted_step_time(name, p, m, v, costs=c)
    formula = {"gpipe": "(m + p - 1)(t_f + t_b)", "1f1b": "(m + p - 1)(t_f + t_b)",
               "interleaved_1f1b": "(mv + p - 1)(t_f + t_b)",
               "zero_bubble": "m(t_f + t_b) + (p - 1)(t_f + t_i - t_w)"}[name]
    peaks = " ".join(str(tl.peak_in_flight[st]) for st in sorted(tl.peak_in_flight))
    lines = [f"pipeline plan: {name}, p={p} ranks, v={v} stages per rank, m={m} micro-batches, "
             f"t_f={forward:g}, t_b={backward:g} per stage",
             f"step time {tl.step_time:g} (simulated); {formula} = {closed:g}",
             f"bubble {tl.bubble:.3f} (idle share of the step, mean over ranks)",
             f"peak in-flight micro-batches per stage: {peaks}",
             f"messages per step: {sum(1 for r in s.actions for a in r if a.kind.startswith('SEND'))}",
             "", sch.format_timeline(s, tl, width=width),
             "  (digit: micro-batch starting; F forward, b backward, i input-gradient, w weight-gradient, . idle)"]
    if actions:
        lines += [""] + [f"rank {r}: " + " ".join(map(str, s.actions[r])) for r in range(p)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--layout" in argv:
        from llmkern.parallel.tensor_parallel import plan as layout

        return layout.main([a for a in argv if a != "--layout"])
    ap = argparse.ArgumentParser(prog="llmkern plan", description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", action="store_true", required=True, help="plan a pipeline schedule")
    ap.add_argument("--stages", type=int, required=True, help="pipeline ranks p")
    ap.add_argument("--microbatches", type=int, required=True, help="micro-batches m per step")
    ap.add_argument("--schedule", choices=sch.SCHEDULES, default="1f1b")
    ap.add_argument("--virtual-stages", type=int, default=None, help="stages per rank v (interleaved: default 2)")
    ap.add_argument("--forward", type=float, default=1.0, help="forward time of one stage on one micro-batch")
    ap.add_argument("--backward", type=float, default=2.0, help="backward time of one stage on one micro-batch")
    ap.add_argument("--message", type=float, default=0.0, help="latency of one send between ranks")
    ap.add_argument("--width", type=int, default=100, help="characters of the timeline")
    ap.add_argument("--actions", action="store_true", help="also list every rank's actions")
    args = ap.parse_args(argv)
    v = args.virtual_stages or (2 if args.schedule == "interleaved_1f1b" else 1)
    try:
        print(pipeline_report(args.schedule, args.stages, args.microbatches, v, forward=args.forward,
                              backward=args.backward, message=args.message, width=args.width,
                              actions=args.actions))
    except sch.ScheduleError as e:
        print(f"llmkern plan: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

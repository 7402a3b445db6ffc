"""Pipeline parallelism: schedules as checked data (`schedules`), model partitioning (`partition`),
the split backward of zero-bubble schedules (`backward`) and the runtime (`runtime`)."""
from llmkern.parallel.pipeline.runtime import (
    CausalLMLoss,
    Pipeline,
    PipelineConfig,
    PipelineError,
    PipelineStats,
    apply_pipeline,
)
from llmkern.parallel.pipeline.schedules import Action, Costs, Schedule, ScheduleError, make_schedule, simulate

__all__ = ["Action", "CausalLMLoss", "Costs", "Pipeline", "PipelineConfig", "PipelineError", "PipelineStats",
           "Schedule", "ScheduleError", "apply_pipeline", "make_schedule", "simulate"]

"""`llmkern train --config FILE`: any method on any layout from one YAML/JSON file.

    config.py   TrainConfig (sections of kw_only dataclasses), load_config, --set overrides, checks
    layout.py   the parallel section turned into engines (parallelize), the one routing function
    data.py     the synthetic digit tasks and local JSONL text / prompt-response data, tokenizers
    runner.py   the run: relaunch under torchrun, training loop, eval, metrics, plot, checkpoints
"""
from llmkern.train.config import ConfigError, TrainConfig, from_dict, load_config

__all__ = ["ConfigError", "TrainConfig", "from_dict", "load_config"]

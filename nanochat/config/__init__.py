"""
Typed run configs: one frozen dataclass per family of scripts (training, RL, evaluation, serving), built once from
the command line by nanochat/cli.py, saved into checkpoint meta as it is (dataclasses.asdict) and read back for
--resume and for inheriting a source checkpoint's settings. The library reads configs, never argparse.

A field is a flag: its name, default, help, check and short alias are all here (`flag()`), and a config checks its
own values when it is built, from the command line or from code, so a bad value is refused before any work.
"""

from nanochat.config.base import ConfigError, flag, validate
from nanochat.config.evaluate import BaseEvalConfig, BaseLossConfig, ChatCliConfig, ChatEvalConfig, CheckpointConfig
from nanochat.config.tools import (
    CompareConfig,
    DownloadConfig,
    ExportConfig,
    ImportConfig,
    TokEvalConfig,
    TokTrainConfig,
)
from nanochat.config.train import (
    INHERITED,
    BaseTrainConfig,
    FinetuneConfig,
    MidConfig,
    RLConfig,
    SFTConfig,
    TrainConfig,
    inherit,
)

__all__ = ["ConfigError", "flag", "validate", "BaseEvalConfig", "BaseLossConfig", "ChatCliConfig", "ChatEvalConfig",
           "CheckpointConfig", "CompareConfig", "DownloadConfig", "ExportConfig", "ImportConfig", "TokEvalConfig",
           "TokTrainConfig",
           "INHERITED", "BaseTrainConfig", "FinetuneConfig", "MidConfig", "RLConfig", "SFTConfig", "TrainConfig",
           "inherit"]

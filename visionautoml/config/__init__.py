"""The one validated job configuration, with the cloud AutoML service's names, and how it is read.

``models`` holds the sections and fields; ``loading`` reads YAML files, ``--set`` overrides
and the cloud service's job files (``cloud``). Import from here: ``from visionautoml.config
import JobConfig, load_config``.
"""

from visionautoml.config.loading import apply_setting, load_config, parse_config, read_raw_config
from visionautoml.config.models import (
    DEFAULT_WORKSPACE,
    NOT_IN_ZOO,
    Compute,
    EarlyTermination,
    JobConfig,
    Limits,
    ParameterDistribution,
    Pipeline,
    Register,
    Sweep,
    Thresholds,
    Tiling,
    Tracking,
    TrainingParameters,
    search_space_problems,
)

__all__ = [
    "DEFAULT_WORKSPACE",
    "NOT_IN_ZOO",
    "Compute",
    "EarlyTermination",
    "JobConfig",
    "Limits",
    "ParameterDistribution",
    "Pipeline",
    "Register",
    "Sweep",
    "Thresholds",
    "Tiling",
    "Tracking",
    "TrainingParameters",
    "apply_setting",
    "load_config",
    "parse_config",
    "read_raw_config",
    "search_space_problems",
]

"""Memory tasks for long-context models (RMT report; BABILong): generated on the fly from a seed."""

from msrnn.tasks.babilong import babilong_samples, read_babilong
from msrnn.tasks.noise import noise_sentences
from msrnn.tasks.samples import TaskGenerator, TaskSample, collate
from msrnn.tasks.templates import TASKS, Episode, TaskSpec

__all__ = ["TASKS", "Episode", "TaskGenerator", "TaskSample", "TaskSpec", "babilong_samples", "collate",
           "noise_sentences", "read_babilong"]

"""Training: stage 0 (teacher), stages 1-3, masking/replacement, losses, optimiser, EMA, and
the shared resumable loop (docs/architecture.md, `sftok/train/`). No Ray, no MLflow here:
each stage is a plain function taking a config, an optional start state and a callback.
"""
from sftok.train.loop import NonFiniteLossError
from sftok.train.stages import StageResult, check_world_size, train_stage
from sftok.train.teacher_stage import (
                                       TeacherUnavailableError,
                                       get_teacher,
                                       teacher_cache_key,
                                       teacher_info,
                                       train_teacher,
)

__all__ = [
                                       "NonFiniteLossError",
                                       "StageResult",
                                       "TeacherUnavailableError",
                                       "check_world_size",
                                       "get_teacher",
                                       "teacher_cache_key",
                                       "teacher_info",
                                       "train_stage",
                                       "train_teacher",
]

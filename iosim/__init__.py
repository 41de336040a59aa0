"""iosim: count the bytes and FLOPs attention algorithms move through a GPU's memory hierarchy,
predict their run time, and check the predictions against real kernels."""
from .errors import IosimError, SpecError, TilingError
from .executor import execute, run_attention, run_attention_backward
from .hardware import Hardware, list_presets, load_hardware
from .reference import reference_attention
from .schedules import ALGORITHMS, build_schedule
from .shape import AttentionShape
from .simulate import MODELS, SimulationResult, simulate

__all__ = ["AttentionShape", "Hardware", "IosimError", "SpecError", "TilingError", "ALGORITHMS",
           "build_schedule", "execute", "list_presets", "load_hardware", "reference_attention",
           "run_attention", "run_attention_backward", "simulate", "SimulationResult", "MODELS"]

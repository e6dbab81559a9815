"""Networks used by the benchmarks: the EDM2 U-Net ("config G") and its presets."""

from .edm2 import (
    EDM2_DATASETS,
    EDM2_NUM_CLASSES,
    EDM2_PRESETS,
    Block,
    MPConv,
    MPFourier,
    Precond,
    UNet,
    edm2_preset,
    edm2_preset_kwargs,
    prepare_for_inference,
    randomize_gains_,
    unprepare,
)
from .edm2_snapshot import load_edm2_snapshot

__all__ = [
    "EDM2_DATASETS",
    "EDM2_NUM_CLASSES",
    "EDM2_PRESETS",
    "Block",
    "MPConv",
    "MPFourier",
    "Precond",
    "UNet",
    "edm2_preset",
    "edm2_preset_kwargs",
    "load_edm2_snapshot",
    "prepare_for_inference",
    "randomize_gains_",
    "unprepare",
]

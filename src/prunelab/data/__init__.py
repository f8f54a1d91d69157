from .sources import load_text
from .windows import calibration_windows, evaluation_windows

__all__ = ["load_text", "calibration_windows", "evaluation_windows"]

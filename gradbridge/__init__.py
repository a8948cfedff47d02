"""gradbridge: is the gradient of your code right? One call, in NumPy, PyTorch, JAX, TensorFlow or autograd.

>>> import gradbridge as gb
>>> report = gb.check(fn, x, w)      # compare autodiff (or your grad) with finite differences
>>> print(report); assert report.passed

The core imports only the standard library and NumPy; framework adapters (``gradbridge.backends``)
are imported only when a check needs them.
"""

from ._api import assert_check, check, clear_cache
from ._cli.cases import case
from ._comparing import Comparison, Implementation, PairDifference, compare
from ._comparing.mapping import Layout, channels_last
from ._errors import (BackendNotAvailableError, FunctionEvaluationError, GradbridgeError, GradientCheckError,
                      InvalidArgumentError, ModeUnsupportedError)
from ._reporting.export import write_html, write_json
from ._reporting.report import Report, RowResult, StepSweep, WorstElement
from ._reporting.terminal import print_report
from ._taps import tap

__version__ = "0.1.0"

__all__ = [
    "check", "assert_check", "clear_cache", "Report", "RowResult", "WorstElement", "GradbridgeError", "GradientCheckError",
    "InvalidArgumentError", "BackendNotAvailableError", "FunctionEvaluationError", "ModeUnsupportedError",
    "StepSweep", "__version__", "case", "compare", "Comparison", "Implementation", "PairDifference",
    "print_report", "write_json", "write_html", "tap", "Layout", "channels_last",
]

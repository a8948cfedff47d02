"""Complex values in a check: checked through their real views (see ``backends/common/complex.py`` for how the
adapters lay them out). What the core says about them: the convention, the names of elements, the report's note."""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence

import numpy as np

#: The real dtype of each complex dtype's parts.
REAL_PARTS = {"complex64": "float32", "complex128": "float64"}

#: gradbridge's convention for the gradient of a complex value (for notes and messages).
CONVENTION = ("gradients of complex values are compared as dL/dRe + i dL/dIm (PyTorch's and TensorFlow's "
              "convention; JAX and autograd return its conjugate, which the check maps to it)")


def is_complex_dtype(dtype: Any) -> bool:
    """Whether a dtype name (``"complex128"``, ``"torch.complex64"``) is complex."""
    return "complex" in str(dtype)


def element_part(index: Sequence[int]) -> str:
    """``[1, 0]`` of a complex leaf's real view as ``[1].real`` (the readable name of one element)."""
    inner = ", ".join(str(int(i)) for i in index[:-1])
    return (f"[{inner}]" if inner else "") + (".real" if int(index[-1]) == 0 else ".imag")


def complex_names(leaves: Iterable[Any]) -> List[str]:
    """The names of the leaf or output specs whose dtype is complex."""
    return [leaf.name for leaf in leaves if is_complex_dtype(leaf.dtype)]


def view_note(names: Iterable[str]) -> Optional[str]:
    """The report's note when complex leaves or outputs were checked through their real views."""
    names = list(dict.fromkeys(names))
    if not names:
        return None
    return (f"complex values {', '.join(names)} are checked through their real views: the last index is 0 for the "
            f"real part and 1 for the imaginary part (torch.view_as_real's layout); {CONVENTION}")


def index_text(index: Sequence[int], complex_view: bool = False) -> str:
    """An element's index as the report shows it: ``[0, 2]``, or ``[0].imag`` for a complex value's real view."""
    if complex_view and index:
        return element_part(index)
    return "[" + ", ".join(str(i) for i in index) + "]" if index else ""


def _signs(size: int, complex_view: bool) -> np.ndarray:
    """+1 for real parts (and real values), -1 for imaginary parts: conjugation in a real view."""
    signs = np.ones(size)
    if complex_view:
        signs[1::2] = -1.0
    return signs


def conjugation(analytic: np.ndarray, numeric: np.ndarray, allowed: np.ndarray, input_name: str, input_complex: bool,
                output_name: str, output_complex: bool) -> Optional[str]:
    """Why a failing block between complex values is wrong, when the analytic block is the numeric one
    conjugated (every entry within its tolerance once the imaginary parts' signs are flipped): the classic
    missing (or extra) ``conj()``, or a rule written in the other framework's convention. None otherwise.

    ``analytic``, ``numeric``, ``allowed``: the (output, input) block, real views laid out as the leaves are."""
    rows, columns = analytic.shape
    signs_in, signs_out = _signs(columns, input_complex), _signs(rows, output_complex)
    patterns = []
    if input_complex:
        patterns.append(("input", np.ones(rows)[:, None] * signs_in[None, :]))
    if input_complex and output_complex:
        patterns.append(("both", signs_out[:, None] * signs_in[None, :]))
    if output_complex:
        patterns.append(("output", signs_out[:, None] * np.ones(columns)[None, :]))
    for kind, signs in patterns:
        flipped = signs * numeric
        if np.array_equal(flipped, numeric):
            continue
        if np.all(np.abs(analytic - flipped) <= allowed):
            if kind == "input":
                return (f"the gradient of {input_name} is the complex conjugate of the right one (every imaginary "
                        "part has the wrong sign): a missing or extra conj() in the rule, or the gradient in JAX's "
                        "convention (dL/dRe - i dL/dIm) where PyTorch's and TensorFlow's (dL/dRe + i dL/dIm) is meant")
            if kind == "both":
                return (f"the derivative of {output_name} by {input_name} is conjugated (analytic = numeric with the "
                        "signs of the real-imaginary cross terms flipped): a missing or extra conj() in the rule. For "
                        "a holomorphic f, PyTorch's and TensorFlow's backward returns grad * conj(f'(z)), JAX's "
                        "custom_vjp returns ct * f'(z): a rule written in one convention and run in the other does "
                        "exactly this")
            return (f"the cotangent of {output_name} is used conjugated (every imaginary part of {output_name}'s "
                    "incoming gradient has the wrong sign): a missing or extra conj() of the incoming gradient")
    return None


def mark_complex(rows: Iterable[Any], leaves: Sequence[Any], outputs: Sequence[Any], notes: List[str]) -> None:
    """Flag the report's rows whose input or output is complex (their indices then read ``[i].real``) and add the
    note on real views and the convention."""
    inputs, complex_outputs = complex_names(leaves), complex_names(outputs)
    for row in rows:
        row.input_complex = row.input in inputs
        row.output_complex = row.output in complex_outputs
    note = view_note(inputs + complex_outputs)
    if note and note not in notes:
        notes.append(note)

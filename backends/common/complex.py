"""Complex inputs and outputs, checked through their real views (shared by every adapter).

The core works on real vectors. A complex leaf ``z`` of shape ``S`` is laid out as its real view, shape
``S + (2,)``: index ``[..., 0]`` is the real part and ``[..., 1]`` the imaginary part (``torch.view_as_real``'s
layout). Each adapter turns the real view back into a complex array *inside* the computation it differentiates
(``torch.view_as_complex``, ``lax.complex``, ``tf.complex``, ``re + 1j*im``) and a complex output into its real
view the same way, so the real and imaginary parts are perturbed separately (both Wirtinger derivatives, as
torch's gradcheck does) and every framework's own complex convention is applied by the framework itself.

The gradient the check compares is therefore the real one, ``(dL/dRe z, dL/dIm z)``. Written as a complex
number it is ``dL/dRe z + i dL/dIm z`` (= ``2 dL/dz̄``): gradbridge's convention, which PyTorch and TensorFlow
return; JAX and autograd return its conjugate. A hand-written ``grad=`` follows gradbridge's convention: it
receives the cotangent of a complex output as ``dL/dRe y + i dL/dIm y`` and returns ``dL/dRe z + i dL/dIm z``.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

from gradbridge._complex import is_complex_dtype  # noqa: F401 (the kit's vocabulary)


def real_view_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """The shape of a complex array's real view: one more axis of 2 (real, imaginary)."""
    return tuple(int(d) for d in shape) + (2,)


def real_view_array(value: Any) -> np.ndarray:
    """A NumPy complex array (or anything ``np.asarray`` takes) as its float64 real view, shape ``S + (2,)``."""
    array = np.asarray(value, dtype=np.complex128)
    return np.stack([array.real, array.imag], axis=-1)


def complex_from_view(view: Any) -> np.ndarray:
    """The complex NumPy array whose real view is ``view`` (shape ``S + (2,)``)."""
    view = np.asarray(view)
    return view[..., 0] + 1j * view[..., 1]

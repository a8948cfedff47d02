"""Functions with internal adaptivity, written as published packages write them, with their own rules.

* :func:`odeint_rk45`: an adaptive Dormand-Prince 5(4) solver (the step controller of scipy's RK45 and
  torchdiffeq's ``dopri5``) whose gradient is the continuous adjoint: the augmented adjoint ODE solved
  backwards with the same adaptive solver (torchdiffeq's ``odeint_adjoint``, JAX's
  ``jax.experimental.ode.odeint``). Its output is smooth only down to the solver's tolerance: a small
  change of the input changes the controller's accepted steps, and the output moves in tiny jumps.
* :func:`fixed_point`: ``x = g(x, theta)`` solved by iteration until the update is below a tolerance, with
  the implicit-function-theorem gradient (deep-equilibrium models, ``jaxopt``'s implicit diff).

Both are NumPy forwards with NumPy VJPs (``backward(cotangent, *inputs)``), so ``kits.make_op`` turns them
into every framework's custom-gradient op.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

# Dormand-Prince 5(4) tableau
_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
      [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
_B5 = np.array([35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0])
_B4 = np.array([5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])


def dopri5(f: Callable[[float, np.ndarray], np.ndarray], y0: np.ndarray, t0: float, t1: float,
           rtol: float, atol: float) -> np.ndarray:
    """y(t1) of y' = f(t, y), y(t0) = y0, with adaptive steps (either direction of time)."""
    y = np.array(y0, dtype=np.float64)
    t, direction = t0, np.sign(t1 - t0)
    scale = atol + rtol * np.abs(y)
    d0, d1 = np.linalg.norm(y / scale), np.linalg.norm(f(t, y) / scale)
    h = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
    h = min(h, abs(t1 - t0))
    for _ in range(100_000):
        if direction * (t1 - t) <= 0:
            return y
        h = min(h, abs(t1 - t))
        k = []
        for stage in range(7):
            yi = y + direction * h * sum(a * kj for a, kj in zip(_A[stage], k))
            k.append(f(t + direction * _C[stage] * h, yi))
        y5 = y + direction * h * sum(b * kj for b, kj in zip(_B5, k))
        y4 = y + direction * h * sum(b * kj for b, kj in zip(_B4, k))
        scale = atol + rtol * np.maximum(np.abs(y), np.abs(y5))
        error = np.sqrt(np.mean(((y5 - y4) / scale) ** 2))
        if error <= 1.0:
            t, y = t + direction * h, y5
        factor = 0.9 * error ** -0.2 if error > 0 else 10.0
        h *= min(10.0, max(0.2, factor))
    raise RuntimeError("dopri5: too many steps")


def _lotka_volterra(y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    u, v = y
    a, b, c, d = theta
    return np.array([a * u - b * u * v, -c * v + d * u * v])


def _lotka_volterra_vjp(a_: np.ndarray, y: np.ndarray, theta: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(a^T df/dy, a^T df/dtheta)."""
    u, v = y
    a, b, c, d = theta
    dy = np.array([a_[0] * (a - b * v) + a_[1] * d * v, a_[0] * (-b * u) + a_[1] * (-c + d * u)])
    dtheta = np.array([a_[0] * u, -a_[0] * u * v, -a_[1] * v, a_[1] * u * v])
    return dy, dtheta


def odeint_rk45(y0: np.ndarray, theta: np.ndarray, t1: float = 2.0, rtol: float = 1e-7,
                atol: float = 1e-9) -> np.ndarray:
    """Lotka-Volterra populations at ``t1`` from ``y0`` with rates ``theta``, adaptive RK45."""
    return dopri5(lambda t, y: _lotka_volterra(y, theta), y0, 0.0, t1, rtol, atol)


def odeint_rk45_adjoint(g: np.ndarray, y0: np.ndarray, theta: np.ndarray, t1: float = 2.0, rtol: float = 1e-7,
                        atol: float = 1e-9, bug: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """The continuous adjoint (torchdiffeq's ``odeint_adjoint``): solve [y, a, g_theta] backwards from t1.

    ``bug`` seeds a mistake: ``"sign"`` flips the sign of the theta-adjoint's dynamics for its first
    entry, ``"relative"`` scales theta's gradient by 1 + 1e-4."""
    y1 = odeint_rk45(y0, theta, t1, rtol, atol)

    def augmented(t: float, state: np.ndarray) -> np.ndarray:
        y, a = state[:2], state[2:4]
        dy, dtheta = _lotka_volterra_vjp(a, y, theta)
        if bug == "sign":
            dtheta = dtheta * np.array([-1.0, 1.0, 1.0, 1.0])
        return np.concatenate([_lotka_volterra(y, theta), -dy, -dtheta])

    state = dopri5(augmented, np.concatenate([y1, g, np.zeros(4)]), t1, 0.0, rtol, atol)
    grad_theta = state[4:]
    if bug == "relative":
        grad_theta = grad_theta * (1.0 + 1e-4)
    return state[2:4], grad_theta


def fixed_point(x: np.ndarray, w: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """z = tanh(w z + x) by iteration until the update is below ``tol`` (a deep-equilibrium layer)."""
    z = np.zeros_like(x)
    for _ in range(10_000):
        new = np.tanh(w @ z + x)
        if np.max(np.abs(new - z)) < tol:
            return new
        z = new
    raise RuntimeError("fixed_point: no convergence")


def fixed_point_vjp(g: np.ndarray, x: np.ndarray, w: np.ndarray, tol: float = 1e-9,
                    bug: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """Implicit-function-theorem VJP: u = (I - J^T)^-1 g with J = diag(1 - z^2) w, then through x and w."""
    z = fixed_point(x, w, tol)
    s = 1.0 - z ** 2
    jac = s[:, None] * w
    u = np.linalg.solve(np.eye(len(z)) - jac.T, g)
    su = s * u
    if bug == "transpose":
        return su, np.outer(z, su)
    return su, np.outer(su, z)


def kepler_bisection(mean_anomaly: np.ndarray, eccentricity: np.ndarray, xtol: float = 1e-10) -> np.ndarray:
    """Eccentric anomaly E with E - e sin E = M, by bisection to ``xtol`` (an orbit propagator's solver).

    Bisection stops after a fixed number of halvings, so its output is a staircase in (M, e): it moves in
    steps of about ``xtol`` as the inputs change, everywhere."""
    low, high = mean_anomaly - 1.0, mean_anomaly + 1.0
    while np.max(high - low) > xtol:
        mid = 0.5 * (low + high)
        above = mid - eccentricity * np.sin(mid) > mean_anomaly
        high = np.where(above, mid, high)
        low = np.where(above, low, mid)
    return 0.5 * (low + high)


def kepler_vjp(g: np.ndarray, mean_anomaly: np.ndarray, eccentricity: np.ndarray, xtol: float = 1e-10,
               bug: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """Implicit-function-theorem VJP: dE/dM = 1 / (1 - e cos E), dE/de = sin E / (1 - e cos E)."""
    e_anomaly = kepler_bisection(mean_anomaly, eccentricity, xtol)
    denominator = 1.0 - eccentricity * np.cos(e_anomaly)
    d_mean, d_ecc = g / denominator, g * np.sin(e_anomaly) / denominator
    if bug == "relative":
        d_ecc = d_ecc * (1.0 + 1e-4)
    elif bug == "sign":
        d_mean = d_mean * np.where(np.arange(d_mean.size) == 1, -1.0, 1.0)
    return d_mean, d_ecc

"""Randomness: implementations whose outputs depend on random numbers (dropout in train mode, sampling).

Each implementation runs with its random generators pinned to the comparison's seed, so it repeats itself, but two
frameworks draw different numbers from the same seed: their dropout masks differ, and so do their values. That is
no wrong forward pass. When values disagree, each implementation is evaluated once more with another seed; one
whose outputs change is named as random, and its disagreements are explained as randomness instead of blamed on
a forward pass.

Invariant: an implementation is called random only on evidence (its outputs changed with the seed beyond
round-off at the compared point); the extra evaluation never changes its run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .._agreement import disagreement
from .runs import ImplementationRun, evaluate_run, _prepare

#: Added to the comparison's seed for the second evaluation.
OTHER_SEED = 7919


def seed_dependent(run: ImplementationRun, params: Optional[Dict[str, np.ndarray]],
                   common_values: Callable[[ImplementationRun], None]) -> List[str]:
    """The outputs of ``run`` that change when its random generators are seeded differently (empty: none, or it
    could not be told)."""
    other = ImplementationRun(run.entry, run.binding)
    other.spec = dataclasses.replace(run.spec, seed=run.spec.seed + OTHER_SEED)
    try:
        other.prepared = _prepare(other, None, params)
        evaluate_run(other, params)
        common_values(other)
    except Exception:  # the question is an aid to the verdict: no answer means no claim
        return []
    eps = run.precision.eps if run.precision is not None else float(np.finfo(np.float64).eps)
    return [name for name in run.output_order
            if name in other.values and disagreement(run.values[name], other.values[name], eps, rows=False)]


def random_implementations(runs: Sequence[ImplementationRun], params: Dict[str, Optional[Dict[str, np.ndarray]]],
                           common_values: Callable[[ImplementationRun], None]) -> Dict[str, List[str]]:
    """``{label: outputs that change with the seed}`` for every implementation with such outputs
    (``common_values`` lays a run's outputs out as the comparison's are)."""
    found = {}
    for run in runs:
        changed = seed_dependent(run, params[run.entry.label], common_values)
        if changed:
            found[run.entry.label] = changed
    return found


def randomness_sentence(random: Dict[str, List[str]], labels: Sequence[str]) -> str:
    """The verdict: who draws random numbers, and how to compare them anyway."""
    who = [label for label in labels if label in random]
    outputs = sorted({name for label in who for name in random[label]})
    names = ", ".join(f"'{n}'" for n in outputs)
    verb = "draws" if len(who) == 1 else "draw"
    return (f"{' and '.join(who) if len(who) <= 2 else ', '.join(who)} {verb} random numbers: {names} changed when "
            "its random generators were seeded differently (dropout or noise in train mode, sampling), and no two "
            "frameworks draw the same numbers from one seed, so their values and gradients cannot agree; this is not "
            "a wrong forward pass. Compare with train=False (dropout off), or pass the randomness in as an input "
            "(a mask, a noise array) so every implementation uses the same; each own check pins its generators and "
            "still judges its gradients")

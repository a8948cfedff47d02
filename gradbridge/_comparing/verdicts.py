"""The sentences of a comparison: which implementation is wrong, from the pairwise differences and each
implementation's own finite-difference check (the third opinion).

Invariant: a sentence blames an implementation only where the numbers show it (a majority, or an own check
that failed); otherwise it says what disagrees without guessing.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple


from .._reporting.report import Report
from .differences import leaf_order
from .result import Comparison, PairDifference
from .patterns import describe
from .render import joined, element_at, quoted
from .randomness import randomness_sentence
from .runs import ImplementationRun

# --- verdicts ---

def _agreeing_groups(labels: Sequence[str], disagree: Set[frozenset]) -> List[Tuple[str, ...]]:
    """The largest sets of implementations that all agree with each other, largest first."""
    best: List[Tuple[str, ...]] = []
    for size in range(len(labels), 0, -1):
        for group in itertools.combinations(labels, size):
            if all(frozenset(p) not in disagree for p in itertools.combinations(group, 2)):
                best.append(group)
        if best:
            return best
    return best


def _majority(labels: Sequence[str], disagree: Set[frozenset]) -> Optional[Tuple[str, ...]]:
    """The one largest group of at least two agreeing implementations, when it is unique and not everyone."""
    groups = _agreeing_groups(labels, disagree)
    if len(groups) == 1 and 2 <= len(groups[0]) < len(labels):
        return groups[0]
    return None


class _Facts:
    """What the verdicts are drawn from: disagreements per (quantity, leaf), own-check failures per leaf."""

    def __init__(self, comparison: Comparison, runs: Sequence[ImplementationRun]) -> None:
        self.labels = comparison.implementations
        self.runs = {r.entry.label: r for r in runs}
        self.pairs = list(comparison.pairs)
        self.complex = set(comparison.complex_leaves)
        #: implementations whose own check could not judge (it raised or refused): never "passes"
        self.unjudged = {label for label, report in comparison.checks.items() if report.problem is not None}
        self.disagree: Dict[Tuple[str, str], Set[frozenset]] = {}
        self.worst: Dict[Tuple[str, str], PairDifference] = {}
        for p in self.pairs:
            key = (p.quantity, p.leaf)
            self.disagree.setdefault(key, set())
            if not p.passed:
                self.disagree[key].add(frozenset((p.first, p.second)))
                if key not in self.worst or p.max_rel_diff > self.worst[key].max_rel_diff:
                    self.worst[key] = p
        self.own_failed: Dict[str, Set[str]] = {}
        self.checked = bool(comparison.checks)
        self.kinks = _kink_indices(comparison.checks)
        self.kink_pairs: Dict[str, List[PairDifference]] = {}  # leaf -> pairs differing at kinks only
        self.kink_own: Dict[str, List[str]] = {}  # leaf -> labels whose own check fails at kinks only
        for p in self.pairs:
            if not p.passed and p.quantity == "gradient" and self._at_kinks_only(p):
                self.kink_pairs.setdefault(p.leaf, []).append(p)
                self.disagree[(p.quantity, p.leaf)].discard(frozenset((p.first, p.second)))
        for label, report in comparison.checks.items():
            failed: Dict[str, List[Any]] = {}
            for row in report.failures:
                failed.setdefault(row.input, []).append(row)
            self.own_failed[label] = set()
            for leaf, rows in failed.items():
                if all(self._kink_row(row) for row in rows):
                    self.kink_own.setdefault(leaf, []).append(label)
                else:
                    self.own_failed[label].add(leaf)

    def _at_kinks_only(self, pair: PairDifference) -> bool:
        """Whether every element of the pair outside the tolerance is a non-differentiable point."""
        kinks = self.kinks.get(pair.leaf, set())
        return bool(pair.outside) and pair.mismatches == len(pair.outside) and set(pair.outside) <= kinks

    def _kink_row(self, row: Any) -> bool:
        """Whether an own-check row fails only at non-differentiable points (``kinks='fail'``/``'subgradient'``)."""
        kinks = self.kinks.get(row.input, set())
        return (row.status == "fail" and 0 < row.mismatches <= row.kinks
                and (row.worst is None or tuple(row.worst.input_index) in kinks))

    def worst_among(self, quantity: str, leaves: Sequence[str], who: Sequence[str],
                    others: Sequence[str] = ()) -> PairDifference:
        """The largest failing pair on ``leaves`` between the implementations named (one of ``who``, the other of
        ``who`` or ``others``): the numbers quoted next to their names are theirs, never a third one's."""
        named = set(who) | set(others)
        found = [p for p in self.pairs if p.quantity == quantity and p.leaf in leaves and not p.passed
                 and {p.first, p.second} <= named and (p.first in who or p.second in who)]
        if not found:
            return max((self.worst[(quantity, leaf)] for leaf in leaves), key=lambda p: p.max_rel_diff)
        return max(found, key=lambda p: p.max_rel_diff)

    def values_differ(self, who: Sequence[str]) -> List[str]:
        """The outputs whose values differ in a pair involving one of ``who``."""
        return [leaf for (quantity, leaf), pairs in self.disagree.items()
                if quantity == "value" and any(set(p) & set(who) for p in pairs)]

    def having(self, quantity: str, leaf: str) -> List[str]:
        side = "values" if quantity == "value" else "gradients"
        return [label for label in self.labels if leaf in getattr(self.runs[label], side)]

    def partners(self, label: str, quantity: str, leaf: str) -> List[str]:
        """The implementations ``label`` disagrees with on this quantity."""
        found = []
        for pair in self.disagree.get((quantity, leaf), set()):
            if label in pair:
                found.extend(x for x in pair if x != label)
        return [x for x in self.labels if x in found]


def _kink_indices(checks: Mapping[str, Report]) -> Dict[str, Set[Tuple[int, ...]]]:
    """Leaf -> the elements any own check found at a non-differentiable point (the same point for all)."""
    kinks: Dict[str, Set[Tuple[int, ...]]] = {}
    for report in checks.values():
        for row in report.rows:
            if row.order == 1:
                kinks.setdefault(row.input, set()).update(tuple(k.input_index) for k in row.nondifferentiable)
    return kinks


def _kink_sentence(facts: "_Facts", leaf: str) -> str:
    """Differences at non-differentiable points: subgradient conventions, not wrong gradients."""
    points = sorted(facts.kinks.get(leaf, set()))
    shown = ", ".join(element_at(leaf, index, leaf in facts.complex) for index in points[:3]) + (", ..." if len(points) > 3 else "")
    parts = [f"'{leaf}' sits at a non-differentiable point here ({shown}: the one-sided derivatives differ)"]
    for p in facts.kink_pairs.get(leaf, []):
        parts.append(f"{p.first} and {p.second} return different subgradients there ({element_at(leaf, p.worst_index, leaf in facts.complex)}: "
                     f"{p.first_value!r} vs {p.second_value!r})")
    own = facts.kink_own.get(leaf, [])
    if own:
        parts.append(f"the own check of {joined(own)} fails only there (kinks= asks for it)")
    return ("; ".join(parts) + ": a convention at a kink, not a wrong gradient; compare at a point away from it, or "
            "align the conventions if they matter to you")


def _verdicts(comparison: Comparison, runs: Sequence[ImplementationRun],
              random: Optional[Mapping[str, List[str]]] = None) -> List[str]:
    """Plain sentences: which side is wrong, on what, and where to look. Also fills ``comparison.patterns``
    (the shapes of the failing pairs' differences), drawn from the same facts. ``random``: implementations whose
    outputs change with the seed (:mod:`.randomness`): their disagreements are explained as randomness."""
    facts = _Facts(comparison, runs)
    sentences = list(comparison.mismatches)
    if random:
        sentences.append(randomness_sentence(random, comparison.implementations))
        for disagree in facts.disagree.values():
            for pair in list(disagree):
                if pair & set(random):
                    disagree.discard(pair)
        facts.pairs = [p for p in facts.pairs if p.first not in random and p.second not in random]
    comparison.patterns = _patterns(facts)
    forward_suspects, value_sentences = _value_verdicts(facts)
    sentences.extend(value_sentences)
    sentences.extend(_gradient_verdicts(facts, forward_suspects))
    for label, report in comparison.checks.items():
        if report.problem:
            sentences.append(f"{label}: its own finite-difference check could not judge the gradients: "
                             f"{report.problem}; see its report")
    return sentences


#: Most pattern sentences per comparison (one per failing pair and leaf, the largest differences first).
PATTERNS_LISTED = 6


def _patterns(facts: _Facts) -> List[str]:
    """Where a failing pair's difference has a simple shape (a transpose, a constant factor or offset, one row,
    column or element), say it: it names the porting bug."""
    found = []
    for pair in sorted((p for p in facts.pairs if not p.passed), key=lambda p: -p.max_rel_diff):
        side = "values" if pair.quantity == "value" else "gradients"
        first = getattr(facts.runs[pair.first], side).get(pair.leaf)
        second = getattr(facts.runs[pair.second], side).get(pair.leaf)
        if first is None or second is None:
            continue
        what = f"the {'value' if pair.quantity == 'value' else 'gradient'} of '{pair.leaf}'"
        sentence = describe(first, second, pair.first, pair.second, what, pair.leaf in facts.complex)
        if sentence is not None:
            found.append(sentence)
        if len(found) == PATTERNS_LISTED:
            break
    return found


def _value_verdicts(facts: _Facts) -> Tuple[Set[str], List[str]]:
    """Who computes different values: the odd ones out by majority, or an honest 'cannot tell'."""
    suspects: Set[str] = set()
    odd: Dict[Tuple[str, Tuple[str, ...]], List[str]] = {}
    sentences = []
    for (quantity, leaf), disagree in facts.disagree.items():
        if quantity != "value" or not disagree:
            continue
        having = facts.having("value", leaf)
        majority = _majority(having, disagree)
        worst = facts.worst[(quantity, leaf)]
        if majority is not None:
            for label in having:
                if label not in majority:
                    odd.setdefault((label, majority), []).append(leaf)
                    suspects.add(label)
            continue
        involved = [x for x in having if any(x in p for p in disagree)]
        suspects.update(involved)
        where = (f"largest relative difference {worst.max_rel_diff:.2e} at {element_at(leaf, worst.worst_index, leaf in facts.complex)}: "
                 f"{worst.first_value!r} ({worst.first}) vs {worst.second_value!r} ({worst.second})")
        if len(having) == 2:
            sentences.append(
                f"{joined(involved)} compute different values of '{leaf}' ({where}): at least one forward pass is "
                "wrong, and with only two implementations gradbridge cannot tell which; compare both forwards line "
                "by line (weight layouts and transposes, biases, axes, epsilons) or add a third implementation, "
                "e.g. a NumPy reference, to get a majority. Finite-difference checks cannot find a wrong forward pass")
        else:
            groups = _agreeing_groups(having, disagree)
            split = " / ".join("{" + ", ".join(g) + "}" for g in groups)
            sentences.append(
                f"the implementations disagree on the value of '{leaf}' with no single majority (agreeing groups: "
                f"{split}; {where}): look at the forward passes of {joined(involved)}; finite-difference checks cannot "
                "find a wrong forward pass")
    for (label, majority), leaves in odd.items():
        worst = facts.worst_among("value", leaves, (label,), majority)
        grads = [leaf for (q, leaf), d in facts.disagree.items()
                 if q == "gradient" and any(label in p for p in d) and leaf not in facts.own_failed.get(label, set())]
        judged = facts.checked and label not in facts.unjudged
        consequence = (f" Its gradients of {quoted(grads)} differ too, consistently with its own forward"
                       + (" (its own finite-difference check passes on them)" if judged else "")
                       + ": fix the forward first." if grads else "")
        sentences.append(
            f"{label}: value of {quoted(leaves)} disagrees with {joined(majority)}, which agree with each other "
            f"(largest relative difference {worst.max_rel_diff:.2e} at {element_at(worst.leaf, worst.worst_index, worst.leaf in facts.complex)}): "
            f"{label}'s forward pass is wrong; look at how it computes {quoted(leaves)} (weight layout or transpose, "
            f"a missing bias or term, an axis, an epsilon, a different convention).{consequence}")
    return suspects, sentences


def _gradient_verdicts(facts: _Facts, forward_suspects: Set[str]) -> List[str]:
    """Wrong backward passes (own finite differences disagree), unreliable checks, unexplained differences."""
    backward: Dict[str, Dict[str, List[str]]] = {}  # label -> leaf -> implementations it disagrees with
    grouped: Dict[Tuple[str, Tuple[str, ...], Tuple[str, ...]], List[str]] = {}
    sentences = []
    for leaf in leaf_order(list(facts.runs.values())):
        key = ("gradient", leaf)
        if key not in facts.disagree:
            continue  # not compared (wrt)
        if leaf in facts.kink_pairs or leaf in facts.kink_own:
            sentences.append(_kink_sentence(facts, leaf))
        having = facts.having("gradient", leaf)
        disagree = facts.disagree[key]
        failing = [x for x in having if leaf in facts.own_failed.get(x, set())]
        if failing and not disagree and len(failing) == len(having) and len(having) > 1:
            sentences.append(
                f"every implementation's own finite-difference check fails on '{leaf}' while their gradients agree "
                "with each other: the finite differences are what is unreliable there (a non-differentiable point, "
                "noise in the function, a step too large); see the reports' details before suspecting the gradients")
            continue
        for label in failing:
            partners = facts.partners(label, "gradient", leaf)
            if partners:
                backward.setdefault(label, {})[leaf] = partners
            else:
                sentences.append(
                    f"{label}: its own finite-difference check fails on '{leaf}', although its gradient agrees with "
                    f"{joined([x for x in having if x != label])}: the finite differences, not the gradient, look "
                    f"unreliable there (a non-differentiable point or noise); see {label}'s report")
        unexplained = {p for p in disagree if not (p & set(failing)) and not (p & forward_suspects)}
        if unexplained:
            key, name = _unexplained(facts, leaf, having, failing, unexplained)
            grouped.setdefault(key, []).append(name)
    for label, by_leaf in backward.items():
        names = list(by_leaf)
        partners = list(dict.fromkeys(x for leaf in names for x in by_leaf[leaf]))
        analytic = getattr(facts.runs[label].prepared, "analytic_source", "its gradient code")
        sentences.append(
            f"{label}: gradient of {quoted(names)} disagrees with {joined(partners)}, and {label}'s own "
            f"finite-difference check fails on {quoted(names)}: {label}'s backward pass is wrong; look at the "
            f"gradient code behind {quoted(names)} ({analytic})")
    for (kind, who, majority), names in grouped.items():
        sentences.append(_unexplained_sentence(facts, kind, who, majority, names))
    return sentences


def _unexplained(facts: _Facts, leaf: str, having: Sequence[str], failing: Sequence[str],
                 disagree: Set[frozenset]) -> Tuple[Tuple[str, Tuple[str, ...], Tuple[str, ...]], str]:
    """Gradients differ where no own check fails and the values agree: (kind, who, majority), the leaf."""
    candidates = [x for x in having if x not in failing]
    majority = _majority(candidates, disagree)
    if majority is not None:
        return ("odd", tuple(x for x in candidates if x not in majority), majority), leaf
    involved = tuple(sorted({x for p in disagree for x in p}, key=list(facts.labels).index))
    return ("split", involved, ()), leaf


def _unexplained_sentence(facts: _Facts, kind: str, who: Tuple[str, ...], majority: Tuple[str, ...],
                          leaves: Sequence[str]) -> str:
    worst = facts.worst_among("gradient", leaves, who, majority)
    where = (f"largest relative difference {worst.max_rel_diff:.2e} at {element_at(worst.leaf, worst.worst_index, worst.leaf in facts.complex)}: "
             f"{worst.first_value!r} ({worst.first}) vs {worst.second_value!r} ({worst.second})")
    names = quoted(leaves)
    involved = list(who) + list(majority)
    unjudged = [label for label in involved if label in facts.unjudged]
    differing = facts.values_differ(who)
    values = ("although the values agree" if not differing
              else f"and their values of {quoted(differing)} differ too (see above)")
    if not facts.checked or unjudged:
        missing = (f"; the own check of {joined(unjudged)} could not run, so it cannot say either"
                   if unjudged else "")
        if kind == "odd":
            return (f"{joined(who)}: gradient of {names} disagrees with {joined(majority)}, which agree with each other "
                    f"({where}): {joined(who)}'s backward pass is likely wrong{missing}"
                    + ("" if facts.checked else "; run with own_check=True to confirm it with its own finite differences"))
        return (f"{joined(who)} compute different gradients of {names} ({where}) and there is no majority to tell "
                f"which is wrong{missing}"
                + ("" if facts.checked else "; run with own_check=True: each implementation's own finite-difference "
                                            "check tells which backward pass is wrong"))
    if kind == "odd":
        return (f"{joined(who)}: gradient of {names} disagrees with {joined(majority)} ({where}), {values} "
                "and every own finite-difference check passes on it: the implementations compute different "
                f"functions near this point (a term that vanishes here, another branch); look at {joined(who)}'s "
                "forward pass, or rerun with mode='full' if the own checks ran in fast mode")
    return (f"{joined(who)} compute different gradients of {names} ({where}), {values} and "
            "their own finite-difference checks pass: their functions differ near this point (a term that vanishes "
            "here, another branch), and gradbridge cannot tell which is meant; look at both forward passes")

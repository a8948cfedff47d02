"""Cross-framework comparison (:func:`gradbridge.compare`): one set of inputs through several implementations.

Modules, in the order data flows through them: :mod:`.api` (the entry point), :mod:`.implementations`
(resolve, convert, bind parameters), :mod:`.runs` (evaluate, differentiate, own checks), :mod:`.differences`
(the pairwise rule), :mod:`.verdicts` (who is wrong), :mod:`.result` and :mod:`.render` (what the user gets).
"""

from .api import compare
from .result import Comparison, Implementation, PairDifference

__all__ = ["compare", "Comparison", "Implementation", "PairDifference"]

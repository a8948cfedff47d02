"""Weight and layout mapping for :func:`gradbridge.compare`: one ``params=`` given to every implementation in
its own names and layouts.

Modules: :mod:`.roles` (the vocabulary of parameter roles, canonical layouts, conversions), :mod:`.names`
(names across frameworks, :class:`FlatParams` keeping the user's nesting), :mod:`.pairing` (which parameter
of one implementation is which of another), :mod:`.params` (every implementation of a comparison:
:func:`map_params`, :class:`MappedParams`), :mod:`.layouts` (NCHW <-> NHWC inputs and outputs). The names
below are what the adapters and ``gb.compare`` use.
"""

from .layouts import Arranger, Layout, channels_last
from .names import FlatParams, flat_params, keep_structure, normalized, shape_of
from .pairing import pair_params
from .params import MappedParams, map_params
from .roles import (BIAS, CONV_KERNEL, DENSE_KERNEL, EMBEDDING, NORM_MEAN, NORM_OFFSET, NORM_SCALE, NORM_VARIANCE,
                    OUT_IN, ParameterRoles, ParamRole, Roles, convert, from_canonical, out_in_spatial, to_canonical)

__all__ = ["Arranger", "BIAS", "CONV_KERNEL", "DENSE_KERNEL", "EMBEDDING", "FlatParams", "Layout", "MappedParams", "NORM_MEAN",
           "NORM_OFFSET", "NORM_SCALE", "NORM_VARIANCE", "OUT_IN", "ParamRole", "ParameterRoles", "Roles",
           "channels_last", "convert", "flat_params", "from_canonical", "keep_structure", "map_params", "normalized",
           "out_in_spatial", "pair_params", "shape_of", "to_canonical"]

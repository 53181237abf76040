"""Restricted unpickling: build only allow-listed objects and refuse every other name before it runs.

A pickle names every class or function it needs by (module, name) and the unpickler looks
each up through `find_class`. Here that look-up admits three kinds of names, and raises
`pickle.UnpicklingError("refusing to load module.name: ...")` for any other one, without
importing its module, so a `__reduce__` calling e.g. `os.system` never runs:

* `PLAIN`: builtin values and containers, numpy arrays, dtypes and scalars (numpy 1.x
  spells its modules `numpy.core`, numpy 2.x `numpy._core`; both are read).
* names the caller adds to `allowed` (e.g. joblib's array wrapper for the tracks).
* stand-ins (`stand_ins`): the class is not imported at all; its objects unpickle to a
  `StandIn` that keeps the state the pickle gives them, for the caller to convert (the
  SMPL files' chumpy arrays and scipy sparse matrices: see sabr_jax.body.smpl).

Python 2 pickles name builtins `__builtin__` and copyreg `copy_reg`; both are mapped
(load them with `encoding="latin1"` so that numpy arrays keep their bytes).
"""

from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Collection, Mapping

PLAIN: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", name)
        for name in (
            "dict",
            "list",
            "tuple",
            "set",
            "frozenset",
            "int",
            "float",
            "complex",
            "str",
            "bytes",
            "bytearray",
            "bool",
            "slice",
            "range",
            "object",
        )
    }
    | {
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *(
            (mod, name)
            for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        ),
        *((mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")),
    }
)
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_NUMPY_DTYPE_CLASS = re.compile(r"[A-Za-z0-9]+DType")  # numpy >= 1.25 may pickle dtypes by class


class StandIn:
    """An object of a class a pickle names but that is not imported; `state` is what the pickle set.

    Subclasses made by `stand_ins` record the (module, name) the pickle used in `pickled_as`.
    """

    pickled_as: tuple[str, str] = ("", "")
    state = None

    def __setstate__(self, state):
        self.state = state


def stand_ins(names: Collection[tuple[str, str]]) -> dict[tuple[str, str], type[StandIn]]:
    """{(module, name): a StandIn subclass} for `find_class`'s `stand_ins`."""
    return {(mod, name): type(name, (StandIn,), {"pickled_as": (mod, name)}) for mod, name in names}


def _new_object(cls, base, state):
    """copyreg._reconstructor as protocols 0 and 1 use it for plain classes: `object.__new__(cls)`, nothing else."""
    if base is not object or state is not None or not isinstance(cls, type) or not issubclass(cls, StandIn):
        raise pickle.UnpicklingError(f"refusing copyreg._reconstructor({cls!r}, {base!r}, ...): only for stand-ins")
    return object.__new__(cls)


def find_class(
    module: str,
    name: str,
    allowed: Collection[tuple[str, str]] = PLAIN,
    stand_ins: Mapping[tuple[str, str], type[StandIn]] | None = None,
    admits: str = "numpy arrays and plain Python values",
):
    """The object `module.name` names if `allowed` (or its stand-in); else UnpicklingError naming it and `admits`.

    With stand-ins, copyreg._reconstructor is admitted too, for stand-in classes only.
    """
    module = _PY2_MODULES.get(module, module)
    if stand_ins:
        if (module, name) in stand_ins:
            return stand_ins[(module, name)]
        if (module, name) == ("copyreg", "_reconstructor"):
            return _new_object
    ok = (module, name) in allowed
    ok |= module in ("numpy.dtypes", "numpy._core.dtypes") and _NUMPY_DTYPE_CLASS.fullmatch(name) is not None
    if not ok:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only {admits} are allowed")
    if module.startswith("numpy.core"):  # numpy 1.x module names, renamed numpy._core in 2.x
        module = "numpy._core" + module[len("numpy.core") :]
    return getattr(importlib.import_module(module), name)


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler whose `find_class` is the restricted one above; subclasses set the class attributes."""

    allowed: Collection[tuple[str, str]] = PLAIN
    stand_ins: Mapping[tuple[str, str], type[StandIn]] = {}
    admits = "numpy arrays and plain Python values"

    def find_class(self, module, name):
        return find_class(module, name, self.allowed, self.stand_ins, self.admits)

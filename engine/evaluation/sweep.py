"""Scheme lists of an evaluation: sweep syntax, early validation, construction for a dataset."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..errors import InvalidParameter, UnknownScheme
from ..schemes import Scheme, available_schemes, make_scheme, parse_factory


def expand_schemes(specs: Sequence[str] | str) -> list[str]:
    """Expand sweep syntax into factory strings.

    ``"biohash:bits=256,512"`` -> ``["biohash:bits=256", "biohash:bits=512"]``: a comma item
    without ``=`` is another value of the preceding parameter; several multi-valued
    parameters give their cartesian product. Each result parses with
    :func:`engine.schemes.parse_factory`.
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        name, _, rest = spec.strip().partition(":")
        if not name:
            raise InvalidParameter(f"empty scheme in {spec!r}")
        params: list[tuple[str, list[str]]] = []
        for item in filter(None, (p.strip() for p in rest.split(","))):
            k, eq, v = item.partition("=")
            if eq:
                if not k.strip() or not v.strip():
                    raise InvalidParameter(f"bad scheme parameter {item!r} in {spec!r}")
                params.append((k.strip(), [v.strip()]))
            elif params:
                params[-1][1].append(item)
            else:
                raise InvalidParameter(f"value {item!r} in {spec!r} has no parameter name")
        if not params:
            out.append(name.strip())
            continue
        keys = [k for k, _ in params]
        for combo in itertools.product(*[vals for _, vals in params]):
            desc = f"{name.strip()}:" + ",".join(f"{k}={v}" for k, v in zip(keys, combo))
            parse_factory(desc)  # validate syntax
            out.append(desc)
    seen: set[str] = set()
    return [d for d in out if not (d in seen or seen.add(d))]


def build_scheme(desc: str, dim: int) -> Scheme:
    """``make_scheme`` with the dataset's dimension unless the factory string gives one (retried
    without it for schemes that do not take ``dim``)."""
    name, params = parse_factory(desc)
    if "dim" in params:
        scheme = make_scheme(name, **params)
        if scheme.dim != dim:
            raise InvalidParameter(f"scheme {desc!r} has dim {scheme.dim}, the data have {dim}")
        return scheme
    try:
        return make_scheme(name, **params, dim=dim)
    except InvalidParameter:
        scheme = make_scheme(name, **params)
        if getattr(scheme, "dim", dim) != dim:
            raise InvalidParameter(f"scheme {name!r} has dim {scheme.dim}, the data have {dim}") from None
        return scheme


def check_schemes(descs: Sequence[str], dim: int | None = None) -> list[str]:
    """Validate factory strings before any work: unknown names and bad parameters raise (with
    the names this build knows). A scheme whose optional dependency is missing (``he`` without
    TenSEAL) passes: the evaluation reports it as skipped. ``dim``: the data's dimension when
    known without loading them (else parameters are checked at the scheme's default)."""
    known = available_schemes()
    for desc in descs:
        name, params = parse_factory(desc)
        if name not in known:
            raise UnknownScheme(f"unknown scheme {name!r} in {desc!r}; available: {', '.join(known)} "
                                "(e.g. --schemes biohash:bits=256 rotation)")
        try:
            if dim:
                build_scheme(desc, dim)
            else:
                make_scheme(name, **params)
        except ImportError:
            continue
        except (InvalidParameter, TypeError) as exc:
            raise InvalidParameter(f"scheme {desc!r}: {exc}") from None
    return list(descs)

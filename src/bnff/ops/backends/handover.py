"""The one place where a fast backend hands a call its kernels do not cover to another backend."""

from __future__ import annotations

import functools
from typing import Callable


def handing_over(sweep: Callable, routes: dict[type[Exception], Callable[[], object]]) -> Callable:
    """``sweep`` wrapped so that, when it raises one of the exception types of ``routes``, the sweep of the
    same name in the backend module that the route returns (``reference``; for the ``cpu`` backend's calls
    on CUDA tensors, ``triton``) runs on the same arguments instead. The route is called only then, so it
    may import its module lazily."""

    @functools.wraps(sweep)
    def run(*args, **kwargs):
        try:
            return sweep(*args, **kwargs)
        except tuple(routes) as exc:
            return getattr(routes[type(exc)](), sweep.__name__)(*args, **kwargs)
    return run

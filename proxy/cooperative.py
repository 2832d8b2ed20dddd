"""gevent's Timeout, when this process runs on gevent (the Procfile's web workers): deadlines on blocking calls."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

_NOT_ASKED = object()
_timeout = _NOT_ASKED


def gevent_timeout():
    """gevent's Timeout class when this process's sockets are gevent's (patched before the app was loaded), else
    None: under threads a blocked call cannot be interrupted from outside."""
    global _timeout
    if _timeout is _NOT_ASKED:
        monkey = sys.modules.get("gevent.monkey")
        if monkey is not None and monkey.is_module_patched("socket"):
            from gevent import Timeout
            _timeout = Timeout
        else:
            _timeout = None
    return _timeout


@contextmanager
def within(seconds: float, too_late: Callable[[], Exception]) -> Iterator[None]:
    """The block, given up on after `seconds` in all (`too_late()` raised instead) under gevent. A socket timeout
    bounds each read alone: an answer trickling in a byte a second kept a send for as long as it lasted. Under
    threads only the per-read timeouts apply."""
    timeout = gevent_timeout()
    if timeout is None:
        yield
        return
    whole = timeout(seconds)
    try:
        with whole:
            yield
    except timeout as fired:
        if fired is not whole:
            raise
        raise too_late() from None

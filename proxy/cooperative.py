"""gevent's Timeout, when this process runs on gevent (the Procfile's web workers): deadlines on blocking calls."""

from __future__ import annotations

import sys

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

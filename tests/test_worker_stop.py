"""The worker's SIGTERM/SIGINT handler (proxy/cli.py): it stops the worker wherever the signal lands."""

import threading

from proxy.cli import setting_from_another_thread


def test_a_signal_landing_while_the_main_thread_holds_the_stop_events_lock_still_stops_the_worker():
    """Python runs a signal handler in the main thread, which may be inside stop.wait() holding the event's
    own lock: a handler calling stop.set() there waited for that lock forever."""
    stop = threading.Event()
    handler = setting_from_another_thread(stop)

    def signal_inside_wait():
        with stop._cond:  # where Event.wait() is when the signal lands
            handler(15, None)

    main = threading.Thread(target=signal_inside_wait, daemon=True)
    main.start()
    main.join(5)
    assert not main.is_alive()  # the handler returned at once
    assert stop.wait(5)  # and the event was set once the lock was free


def test_a_signal_sets_the_stop_event():
    stop = threading.Event()
    setting_from_another_thread(stop)(2, None)
    assert stop.wait(5)

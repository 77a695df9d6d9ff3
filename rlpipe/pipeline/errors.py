"""Errors a supervisor should not answer with a restart."""


class Unrecoverable(Exception):
    """A role failed in a way that restarting it cannot fix: an adapter the sampling engine
    cannot load, an engine that cannot start, a model the config cannot use. The role exits
    with EXIT_UNRECOVERABLE and `rlpipe run` stops the run with this error."""


EXIT_UNRECOVERABLE = 3

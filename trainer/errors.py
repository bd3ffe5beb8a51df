"""Exception types shared by the trainer and the command line (no heavy imports: the CLI loads this first)."""


class DataError(RuntimeError):
    """Reading or transforming input data failed on at least one rank (the message says which and why)."""


__all__ = ["DataError"]

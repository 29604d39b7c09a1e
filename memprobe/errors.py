"""The one exception type that the CLI turns into a single line on stderr and exit code 1."""


class MemprobeError(Exception):
    """A problem with the user's input or environment, stated in one line.

    Library code raises this for anything the user can fix (a bad path, a bad value,
    too few cells to fit); the CLI prints ``str(error)`` and exits 1 without a traceback.
    """

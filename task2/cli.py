"""How the Task 2 scripts report bad input: code below a script raises ``UsageError``; the script's
entry point turns it into one line on stderr and exit status 1, with no traceback."""
import argparse
import contextlib
import sys


class UsageError(ValueError):
    """Input that cannot work (a flag, a file, a folder); the message names it and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that shows each flag's default in --help and reports a bad command line as a UsageError."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def first_line(error):
    """The first line of an exception's message (its type when the message is empty).

    An exception raised in a DataLoader worker reaches the main process as a copy whose message is
    the worker's whole traceback; its own message is then the last line, after "ErrorType: ".
    """
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    if "Traceback" in str(error):
        return lines[-1].split(": ", 1)[-1]
    return lines[0].strip()


@contextlib.contextmanager
def usage_errors_exit():
    """The entry point of a script: a UsageError from the body ends the process with one line."""
    try:
        yield
    except UsageError as error:
        print(f"error: {first_line(error)}", file=sys.stderr)
        sys.exit(1)

"""The error policy of this folder's scripts: code below a script raises a typed error; the
script's entry point (run) catches it once and prints one line on stderr, never a traceback."""
import argparse
import sys

import torch


class UsageError(ValueError):
    """A flag value or combination of flags that cannot work."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an invalid argument prints one line ("prog: error: ...") instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run(main, args, expected_errors):
    """main(args); an exception of a type in expected_errors becomes 'prog: error: <message>', exit 1."""
    try:
        main(args)
    except expected_errors as error:
        if isinstance(error, OSError) and error.strerror:  # e.g. a full disk: "No space left on device: PATH"
            error = f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        message = lines[0]
        if "Traceback" in str(error):
            # raised in a DataLoader worker: the message is the last line, after "module.ErrorType: "
            message = lines[-1].split(": ", 1)[-1]
        sys.exit(f"{sys.argv[0]}: error: {message}")
    except KeyboardInterrupt:
        sys.exit(130)


def pick_device(gpu: int) -> torch.device:
    """cuda:GPU when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if not 0 <= gpu < torch.cuda.device_count():
        raise UsageError(f"--gpu {gpu}: there are {torch.cuda.device_count()} CUDA devices")
    return torch.device(f"cuda:{gpu}")


def flags(options: dict) -> list:
    """{"ch_mult": [1, 2], "use_ema": True, "seed": None} -> ["--ch_mult", "1", "2", "--use_ema"]: a
    script's command-line flags from a dict (True: a switch; False and None: left out)."""
    argv = []
    for name, value in options.items():
        if isinstance(value, bool):
            argv += [f"--{name}"] if value else []
        elif value is not None:
            argv += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return argv

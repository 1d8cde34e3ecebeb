"""Argument parsing that fails like the rest of trainmem: one line, exit code 2."""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage + exits 2
        raise UsageError(f"{self.prog}: {message} (fix: see {self.prog} --help)")


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2

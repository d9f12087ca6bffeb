"""Errors a user can fix: bad files, bad configs. Entry points print them and exit 2."""


class InputError(Exception):
    """Bad input. The message names the file (and line or field) and what is wrong with it."""


EXIT_INPUT_ERROR = 2

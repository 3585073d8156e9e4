"""User-facing errors: one line that names the file or key at fault and what to do."""


class Med3DError(ValueError):
    """Bad input from the user (file, config key, argument); the CLI prints it as one line."""

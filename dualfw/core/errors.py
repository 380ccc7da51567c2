"""Errors about the user's input. The CLI prints them as one line naming the file, key or line."""


class ConfigError(ValueError):
    """A bad config value, prompt file, model folder or other user input."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file or folder named in the config does not exist."""


class StalledRunError(ConfigError):
    """The run cannot make progress with its inputs (e.g. no sampling round gives a preference pair)."""


def find_config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind `exc`, following the chain jsonargparse and Lightning wrap it in."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None

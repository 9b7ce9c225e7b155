"""fedhosp's exceptions: each message says what went wrong and what to do about it.

The CLI prints `error: <message>` for any FedhospError and exits non-zero, so a
message must stand on its own in one line.
"""


class FedhospError(Exception):
    """Base class: an error the user can fix, reported without a traceback."""


class ConfigError(FedhospError, ValueError):
    """A run or site setting is unknown, missing or out of range."""


class DataError(FedhospError):
    """A site's data folder, manifest or image cannot be used."""


class PrivacyBudgetExceeded(FedhospError):
    """A site would spend more privacy budget than its policy allows: it refuses the round."""

    def __init__(self, message: str, *, spent: float, budget: float, would_be: float) -> None:
        super().__init__(message)
        self.spent, self.budget, self.would_be = spent, budget, would_be


class MaskMismatch(DataError):
    """A mask does not fit its image: the data must be fixed, so it stops the site, not skips a file."""


class PrivacyLedgerError(FedhospError):
    """A site's privacy ledger is missing, altered or unreadable: its budget cannot be trusted."""


class ModelFileError(FedhospError):
    """A model file cannot be used here: another format version, no model card, or the wrong task."""


class SiteStateError(FedhospError):
    """A file in a site's state folder is unusable (a truncated secret) or a name points outside it."""

"""The exceptions edgecpm raises. Every message names the file or argument and what to do."""


class EdgeCPMError(Exception):
    """Base class: catch this to handle any edgecpm error."""


class ConfigError(EdgeCPMError, ValueError):
    """A config.json (or manifest config) that edgecpm cannot run."""


class CheckpointError(EdgeCPMError, ValueError):
    """Missing, unexpected, mis-shaped or corrupted weights."""


class BundleError(EdgeCPMError, ValueError):
    """An exported bundle that is incomplete, corrupted or from a newer edgecpm."""


class BudgetError(EdgeCPMError, ValueError):
    """The KV cache budget cannot hold what was asked."""


class BackendUnavailable(EdgeCPMError, RuntimeError):
    """A backend's package or build artefact is not installed."""

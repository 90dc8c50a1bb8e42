"""The project's own error type: the CLI shows its message as one clean line, never a traceback."""


class ChainoptError(Exception):
    """A user-facing problem (bad config, missing model, malformed data) with a message that says the fix."""

    exit_code = 2


class ConfigError(ChainoptError):
    """An experiment file or option is invalid."""


class ModelError(ChainoptError):
    """A model spec cannot be resolved to a usable GGUF file."""


class DataError(ChainoptError):
    """A dataset is missing, empty or malformed."""


class ClusterError(ChainoptError):
    """The Ray backend cannot run: Ray is not installed, the cluster is out of reach, or a worker cannot load
    a model (the message names the node and the file)."""


class BudgetExceeded(ChainoptError):
    """A token ceiling was reached; the chain (or the run) stops cleanly and counts as failed."""

    exit_code = 3

    def __init__(self, scope: str, limit: int, used: int):
        self.scope, self.limit, self.used = scope, limit, used
        super().__init__(f"{scope} token budget reached: {used} of {limit} tokens used")

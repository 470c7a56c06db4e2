"""edgecpm: on-device inference for the MiniCPM4 family.

    import edgecpm
    s = edgecpm.Session("bundle-or-checkpoint/", kv_budget="512MiB")
    print(s.generate("The capital of France is", max_new_tokens=16).text)

Importing edgecpm needs only numpy and tokenizers; backends are imported when a Session needs them.
"""

from edgecpm.drafters import SpecConfig
from edgecpm.errors import (
                            BackendUnavailable,
                            BudgetError,
                            BundleError,
                            CheckpointError,
                            ConfigError,
                            EdgeCPMError,
)
from edgecpm.generate import Generation
from edgecpm.sampling import SamplingParams
from edgecpm.session import Chat, Session
from edgecpm.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = [
                            "BackendUnavailable",
                            "BudgetError",
                            "BundleError",
                            "Chat",
                            "CheckpointError",
                            "ConfigError",
                            "EdgeCPMError",
                            "Generation",
                            "SamplingParams",
                            "Session",
                            "SpecConfig",
                            "Tokenizer",
                            "__version__",
]

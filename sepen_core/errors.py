"""The exception tree of sepen_core: every error the library raises on purpose is a SepenError.

    SepenError
    ├── ConfigError          a setting is out of range; names the field and what to change
    ├── ConceptError         a concept is missing from a prompt or cut off by the token limit
    ├── ModelLoadError       a base-model directory cannot be read
    ├── AdapterError
    │   ├── AdapterFormatError    the file is not a sepen adapter (or is corrupt)
    │   └── AdapterMismatchError  the adapter was trained on another base model
    ├── CheckpointError      a finetune checkpoint does not match the run that tries to resume it
    └── Canceled             the caller asked a finetune or a sampling run to stop

Torch-free, so the gateway can map these to HTTP errors without importing torch. Each class declares
the machine-readable `code` a client sees when a job or a request fails with it.
"""


class SepenError(Exception):
    """Base class of every error raised on purpose by sepen_core."""

    code = "invalid_request"


class ConfigError(SepenError, ValueError):
    """A setting is invalid. `field` names it; the message says what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ConceptError(SepenError, ValueError):
    """A concept cannot be located in a tokenised prompt."""

    code = "concept_not_found"

    def __init__(self, concept: str, prompt: str, message: str):
        super().__init__(f"concept {concept!r} {message} (prompt: {prompt!r})")
        self.concept = concept
        self.prompt = prompt


class ModelLoadError(SepenError):
    """A base-model directory is missing, incomplete or not in diffusers format."""

    code = "model_unavailable"


class AdapterError(SepenError):
    """Base class of adapter errors."""

    code = "adapter_mismatch"


class AdapterFormatError(AdapterError):
    """The bytes are not a sepen key-projection adapter of a supported format version."""


class AdapterMismatchError(AdapterError):
    """The adapter's base-model fingerprint or layer set differs from the model it is applied to."""


class CheckpointError(SepenError):
    """A checkpoint belongs to a different run (other config, concepts or base model)."""

    code = "checkpoint_mismatch"


class Canceled(SepenError):
    """Cooperative cancellation: `should_cancel()` returned True between two steps."""

    code = "canceled"

    def __init__(self, step: int):
        super().__init__(f"canceled after step {step}")
        self.step = step

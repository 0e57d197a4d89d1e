"""sepen_core: Separate-and-Enhance (SepEn) compositional finetuning of Stable-Diffusion-style models.

Load a base model, finetune its cross-attention key projections on concept pairs, save the
result as a key-projection adapter, sample with it, and diagnose object maps before and after:

    from sepen_core import ConceptSet, FinetuneConfig, finetune, generate, load_base_model
    model = load_base_model("path/to/sd-1.5")          # or an SDXL directory; build_tiny_model() for tests
    result = finetune(model, ConceptSet.pairs(("cat", "dog")), FinetuneConfig())
    result.adapter.save("cat-dog.safetensors")
    images = generate(model, "a cat and a dog", adapter=result.adapter).images
    result.adapter.export("kohya", rank=8).data          # a LoRA for ComfyUI, A1111, diffusers

Names are imported lazily, so `import sepen_core.config` (or .errors, .prompts) stays torch-free
for the gateway; anything that runs a model imports torch on first use.
"""

import importlib

_EXPORTS = {
    "sepen_core.adapters": ["KeyProjectionAdapter"],
    "sepen_core.config": ["ExportOptions", "FinetuneConfig", "MapConfig", "SampleConfig"],
    "sepen_core.diagnostics": ["Diagnosis", "diagnose"],
    "sepen_core.errors": [
        "AdapterError",
        "AdapterFormatError",
        "AdapterMismatchError",
        "Canceled",
        "CheckpointError",
        "ConceptError",
        "ConfigError",
        "ModelLoadError",
        "SepenError",
    ],
    "sepen_core.export": ["Export", "export_adapter"],
    "sepen_core.finetuning": ["Checkpoints", "FinetuneResult", "StepReport", "finetune"],
    "sepen_core.models": ["BaseModel", "build_tiny_model", "build_tiny_xl_model", "load_base_model", "load_model"],
    "sepen_core.prompts": ["ConceptSet"],
    "sepen_core.sampling": ["GenerationResult", "generate"],
    "sepen_core.scores": ["MapScores"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'sepen_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)

"""The HTTP routes, one module per resource: finetune, generate, jobs, adapters, models, health."""

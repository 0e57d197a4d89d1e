"""service: the FastAPI gateway: HTTP requests become job rows and broker messages; results go back as JSON and PNGs.

Build the app with `service.app.create_app(settings)`; run it with
`uvicorn --factory service.app:app_from_env`. Imports sepen_store and only the torch-free parts
of sepen_core (config, errors, prompts), so the API process carries no torch.
"""

"""worker: Celery worker processes that turn queued job rows into sepen_core calls and write the results back."""

"""The GPU service: Celery task, batcher, samplers, model registry, storage, webhooks."""

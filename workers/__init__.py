"""Catalog-side workers: fetch → dedup → localize → embed → upsert.

``workers.pipeline`` holds the plain functions; the Celery tasks (``workers.tasks``) are thin wrappers
around them, and the in-process CLI/demo call the same functions directly.
"""

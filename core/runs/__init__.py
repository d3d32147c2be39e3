"""The run store and background jobs: SQLite in the workspace, a worker process, job kinds.

The dashboard uses `core.runs.api` (submit, list, stop, resume, ensure_worker); the worker
(`python -m core worker`) runs the jobs; `python -m core jobs ...` is the command-line view.
"""

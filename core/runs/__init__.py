"""The run store and background jobs: SQLite in the workspace, a worker process, job kinds.

The dashboard uses `core.runs.api` (submit, list, stop, resume, ensure_worker); the worker
(`python -m core worker`) runs the jobs; `python -m core jobs ...` is the command-line view.
Each job kind is one record in `core.runs.kinds` (its request type from `core.services`, its
runner in `core.runs.jobs`, whether it resumes, what the dashboard's address restores); the
store itself (`core.runs.store`) knows no kinds.
"""

"""The service layer: one typed request per kind of work and one ``run(request, progress)``
each. The CLI parses argv into a request, a job stores a request's JSON and the worker
rebuilds it, the pages build requests; nothing below the front ends calls argparse.

- ``request``: what a request is made of (settings with their checks, defaults and help;
  ``from_json``/``to_json``) and `ParameterError`;
- ``datasets``: the dataset settings, the dataset a checkpoint runs on, ``data info``;
- ``train``, ``evaluate``, ``prune``, ``score``, ``export``: the job kinds' requests and runs
  (`core.runs.kinds` names them as jobs);
- ``profile``: a checkpoint's cost (``python -m core profile``);
- ``compare``: the Compare page's comparison of two checkpoints.
"""

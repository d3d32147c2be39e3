"""The service layer: one typed request per kind of work and one ``run(request, progress)``
each. The CLI parses argv into a request, a job stores a request's JSON and the worker
rebuilds it, the pages build requests; nothing below the front ends calls argparse."""

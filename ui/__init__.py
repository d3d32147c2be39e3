"""Dashboard helpers shared by the pages: session state, cached loaders, error boxes.
Thin by design: everything computed here is computed by `core`."""

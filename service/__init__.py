"""HTTP service: search a catalog by image, add and remove items, report health and metrics.

`service.app.app_factory(settings)` builds the FastAPI application and
`service.cli.main` (the `idml-serve` command) runs it under uvicorn. Nothing
in this package imports torch.
"""

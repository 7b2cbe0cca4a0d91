"""Web demo (``medalign serve``, extra ``[demo]``): upload a scan, see what the bundles say.

:mod:`~medalign.serve.service` answers (no web code), :mod:`~medalign.serve.uploads` checks
uploads (no web code), :mod:`~medalign.serve.app` is the FastAPI layer and page.
"""

from medalign.serve.service import DemoService
from medalign.serve.uploads import UploadError, UploadLimits

__all__ = ["DemoService", "UploadError", "UploadLimits", "create_app"]


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    """:func:`medalign.serve.app.create_app`, imported on use so FastAPI stays optional."""
    from medalign.serve.app import create_app as build

    return build(*args, **kwargs)

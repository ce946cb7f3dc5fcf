"""clipseek: text-to-image search over your pictures.

What users touch lives here: the gRPC client (``from clipseek import ClipseekClient``), the
``clipseek`` command, the web page, folder watching, plotting, and the offline demo with its
picture world and model trainer. The flows themselves are in ``flows/`` and their executors in
``executors/``.
"""

__all__ = ["ClipseekClient", "ClipseekError"]


def __getattr__(name):  # the client pulls in jina and docarray: only when asked for
    if name in __all__:
        from clipseek import client

        return getattr(client, name)
    raise AttributeError(f"module 'clipseek' has no attribute {name!r}")

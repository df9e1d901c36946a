"""Built-in sdrt plugins (installed as ``sdrt_plugins``).

Each subpackage is one plugin declared in sdrt's ``[project.entry-points.sdrt]``, registered
through the same hooks a third-party plugin uses.
"""

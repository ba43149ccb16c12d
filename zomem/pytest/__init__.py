"""zomem's pytest plugin: the grid options, the ``zomem`` fixture, the ``zomem_limit`` marker and memory baselines.

Split by role: ``plugin`` registers options and hooks, ``fixture`` is the object a test touches,
``session`` holds run-wide state read once from the options, ``marks`` holds the marker.
"""

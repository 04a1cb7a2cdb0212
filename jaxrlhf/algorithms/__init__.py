"""The algorithms: one module each, each declaring its ``ALGORITHM`` record (``base.Algorithm``).

``jaxrlhf.registry`` collects the records; nothing outside an algorithm's module and its record
asks which algorithm is running. Adding an algorithm = one module here + one line in
``jaxrlhf.registry`` + its config section (``jaxrlhf.config_sections``).
"""

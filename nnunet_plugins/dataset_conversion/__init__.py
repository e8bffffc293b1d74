"""Challenge releases <-> nnU-Net: one module per challenge (label tables as data, ``convert``, ``export``).

``kits21``, ``amos22``, ``segrap2023``, ``myops2020``, ``kipa22``; ``synthetic_releases`` writes tiny releases in
each layout; ``container`` holds the grand-challenge inference entry points; ``common`` the shared machinery.
"""

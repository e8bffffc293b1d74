"""Challenge releases <-> nnU-Net: one module per challenge (label tables as data, ``convert``, ``export``, and its
table entry ``SPEC``: the options it adds to each sub-command and its convert / export / evaluate).

``kits21``, ``amos22``, ``segrap2023``, ``myops2020``, ``kipa22``; ``synthetic_releases`` writes tiny releases in
each layout; ``container`` holds the grand-challenge inference entry points; ``input_check`` verifies prediction
inputs; ``common`` the shared machinery.
"""


def challenges() -> dict:
    """{name: :class:`~nnunet_plugins.dataset_conversion.common.Challenge`} of every supported challenge, the table
    the ``convert`` / ``export`` / ``evaluate`` commands loop over."""
    from . import amos22, kipa22, kits21, myops2020, segrap2023
    return {m.SPEC.name: m.SPEC for m in (kits21, amos22, segrap2023, myops2020, kipa22)}

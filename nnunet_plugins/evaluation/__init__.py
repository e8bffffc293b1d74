"""Official challenge metrics: ``surface`` (vectorised surface Dice, contour Hausdorff / average Hausdorff) and one
evaluator module per challenge (``kits21``, ``amos22``, ``segrap2023``, ``myops2020``, ``kipa22``)."""

"""Training of the StarDist nuclei model: targets, augmentation, the loop, threshold search.

Nothing on the run path (``tme run``, ``tme segment``) imports this subpackage; the
scripts under ``scripts/`` and the tests do.
"""

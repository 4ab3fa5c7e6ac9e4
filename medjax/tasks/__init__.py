"""Exam items and their answers: the item type every benchmark reader yields, answer extraction and
scoring. Shared by eval/ (accuracy) and rl/ (verifiable rewards), so both judge an answer the same way."""


class ItemError(ValueError):
    """A malformed benchmark item; the message names the file and line (or record) at fault."""

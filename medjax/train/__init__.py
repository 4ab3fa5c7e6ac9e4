"""One training loop for every stage; objectives plug into it."""


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite losses, no checkpoint that verifies, a state that would not
    be saved): the message says where it stopped and what is still good."""

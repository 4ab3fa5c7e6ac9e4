"""One training loop for every stage; objectives plug into it."""
